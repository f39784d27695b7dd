"""`AsyncClient` behind the sync client's interface, so one test body checks both clients.

Each call runs to completion on the adapter's own event loop (in the test's
thread: no thread is started), so a test written against `Client` and `Job`
exercises `AsyncClient` and `AsyncJob` unchanged: the same calls, the same
results, the same errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from maas_worker import AsyncClient, AsyncJob, JobInfo, JobState

T = TypeVar("T")


class BlockingAsyncClient:
    """An `AsyncClient` driven from sync code (tests only)."""

    def __init__(self, client: AsyncClient) -> None:
        self.aio = client
        self._loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this adapter's loop."""
        return self._loop.run_until_complete(coro)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.aio, name)  # settings, tenant, keyring, ...

    def submit(self, model: str, inputs: Any, **kw: Any) -> BlockingAsyncJob:
        return BlockingAsyncJob(self, self.run(self.aio.submit(model, inputs, **kw)))

    def submit_many(self, model: str, inputs: Sequence[Any], **kw: Any) -> list[BlockingAsyncJob]:
        jobs = self.run(self.aio.submit_many(model, inputs, **kw))
        return [BlockingAsyncJob(self, j) for j in jobs]

    def job(self, job_id: str) -> BlockingAsyncJob:
        return BlockingAsyncJob(self, self.aio.job(job_id))

    def served_models(self) -> set[str]:
        return self.run(self.aio.served_models())

    def live_workers(self) -> int:
        return self.run(self.aio.live_workers())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        closing = self.aio.aclose()
        try:
            self.run(closing)
        except RuntimeError:  # collected while another adapter's loop runs in this thread
            closing.close()
        finally:
            self._loop.close()

    def __enter__(self) -> BlockingAsyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to release
            self.close()


class BlockingAsyncJob:
    """An `AsyncJob` driven from sync code (tests only)."""

    def __init__(self, client: BlockingAsyncClient, job: AsyncJob) -> None:
        self.client = client
        self.aio = job
        self.id = job.id
        self.tenant = job.tenant
        self.worker_live = job.worker_live

    def __repr__(self) -> str:
        return repr(self.aio)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        return self.client.run(self.aio.result(timeout=timeout))

    def status(self) -> JobState:
        return self.client.run(self.aio.status())

    def info(self) -> JobInfo:
        return self.client.run(self.aio.info())

    def cancel(self) -> bool:
        return self.client.run(self.aio.cancel())

    def exists(self) -> bool:
        return self.client.run(self.aio.exists())

    def waiting(self) -> str:
        return self.client.run(self.aio.waiting())
