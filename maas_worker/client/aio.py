"""The asyncio client: `AsyncClient` submits, `AsyncJob` follows, `as_completed` waits for many.

The same constructor, checks, errors and wire format as `Client`: both drive
`ClientCore` and `JobCore` (core.py, jobcore.py), this one on
``redis.asyncio``. Sealing stays synchronous (microseconds of CPU); there is
no thread pool. Waiting wakes on the jobs' ``done`` lists, many jobs per
``BLPOP`` (waiter.py, docs/async.md)::

    async with AsyncClient.from_env() as client:
        job = await client.submit("echo", {"text": "hi"})
        print(await job.result(timeout=10))
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import redis
import redis.asyncio

from maas_worker.backend import barrier, functions
from maas_worker.backend.redis import async_redis_client
from maas_worker.broker import fetch, shards
from maas_worker.client import markers
from maas_worker.client.core import (
    ClientCore,
    Plan,
    Sealed,
    Step,
    adrive,
    arun_plan,
    broker_unavailable,
    check_job_id,
    check_shard,
    send_interrupted,
)
from maas_worker.client.job import backend_errors
from maas_worker.client.jobcore import JobCore
from maas_worker.client.private import PrivateJobs
from maas_worker.client.waiter import Outcome, Waiter
from maas_worker.client.wire import MessageBuilder
from maas_worker.crypto.envelope import sealed_header_digest
from maas_worker.errors import ResultTimeout, ServiceUnavailable, connection_cause
from maas_worker.protocol import JobInfo, JobState, Priority
from maas_worker.settings import redact_url

log = logging.getLogger(__name__)


class AsyncClient(ClientCore):
    """Submit sealed inference jobs as one tenant, from asyncio code.

    Keywords as `Client` (``broker_url``, ``result_backend``, ``tenant``,
    ``keyring``, ``settings``); use it as ``async with`` or call `aclose`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._backend: redis.asyncio.Redis | None = None
        self._broker: redis.asyncio.Redis | None = None
        self._wire = MessageBuilder()
        self._waiter: Waiter | None = None
        self._private: PrivateJobs | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncClient:
        """A client configured from ``MAAS_*`` variables (see docs/configuration.md)."""
        return cls(**overrides)

    # -- plumbing --------------------------------------------------------------
    @property
    def backend(self) -> redis.asyncio.Redis:
        """``redis.asyncio`` client of the result backend."""
        if self._backend is None:
            self._backend = async_redis_client(
                self.settings.result_backend, tls=self.settings.redis_tls, ha=self.settings.redis_ha
            )
        return self._backend

    @property
    def broker(self) -> redis.asyncio.Redis:
        """``redis.asyncio`` client of the broker (the job queues): of the tenant's shard."""
        if self._broker is None:
            self._broker = shards.async_broker_client(self.settings, self.shard)
        return self._broker

    @property
    def waiter(self) -> Waiter:
        """What wakes this client's awaiting jobs (waiter.py)."""
        if self._waiter is None:
            self._waiter = Waiter(self.backend, self._unavailable)
        return self._waiter

    def _unavailable(self, exc: BaseException) -> BaseException:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return ServiceUnavailable(
                f"result backend unavailable ({redact_url(self.settings.result_backend)}: "
                f"{connection_cause(exc)}); retry later"
            )
        return exc

    async def aclose(self) -> None:
        """Stop waiting and release connections."""
        if self._waiter is not None:
            await self._waiter.close()
        for conn in (self._backend, self._broker):
            if conn is not None:
                await conn.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient(tenant={self.tenant!r})"

    # -- reading the deployment ------------------------------------------------------
    async def served_models(self) -> set[str]:
        """Model references this deployment serves (see `Client.served_models`)."""
        with backend_errors(self.settings):
            try:
                return await arun_plan(self.backend, self.catalog_plan())
            except redis.exceptions.NoPermissionError:
                return await arun_plan(self.backend, self.advertised_plan())

    async def live_workers(self) -> int:
        """How many worker nodes are live (see `Client.live_workers`)."""
        plan = self.live_plan()
        if plan is None:
            return self.cached_live
        with backend_errors(self.settings):
            return await arun_plan(self.backend, plan)

    # -- submitting ------------------------------------------------------------------
    async def submit(
        self, model: str, inputs: Any, *, priority: str = "normal", ttl_s: int | None = None
    ) -> AsyncJob:
        """Seal ``inputs`` for ``model`` and enqueue it (see `Client.submit`)."""
        return (await self.submit_many(model, [inputs], priority=priority, ttl_s=ttl_s))[0]

    async def submit_many(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        priority: str | Priority = "normal",
        ttl_s: int | None = None,
    ) -> list[AsyncJob]:
        """Seal each of ``inputs`` as its own job and enqueue them all in one go, all or
        nothing (see `Client.submit_many`): one pipeline for the messages, one for the
        markers."""
        flow = self.submit_flow(model, inputs, priority=priority, ttl_s=ttl_s)
        sealed, live = await adrive(flow, self._carry_out)
        return [
            AsyncJob(self, h.job_id, request_hash=sealed_header_digest(raw), worker_live=live)
            for h, raw in sealed
        ]

    async def submit_private(
        self,
        model: str,
        vectors: Sequence[Sequence[float]],
        *,
        priority: str = "normal",
        ttl_s: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run ``model`` on encrypted ``vectors``; the decrypted results (see
        `Client.submit_private`). Encryption and decryption run in a thread: a few
        milliseconds each, CPU-bound."""
        if self._private is None:
            self._private = PrivateJobs(self.settings, self.tenant, self.envelope_version)
        private = self._private
        # Loading (or making) the key and encrypting are CPU work: off the event loop.
        key = await asyncio.to_thread(lambda: private.key)
        inputs = await asyncio.to_thread(private.inputs, key, vectors)
        with backend_errors(self.settings):
            ttl = int(await self.backend.ttl(private.context_key(key)))
            if private.needs_registration(ttl, ttl_s):
                name, data, keep_s = private.registration(key)
                await self.backend.set(name, data, ex=keep_s)
        jobs = await self.submit_many(model, inputs, priority=priority, ttl_s=ttl_s)
        outputs = await asyncio.gather(*(job.result(timeout=timeout) for job in jobs))
        return await asyncio.to_thread(private.open, key, [job.id for job in jobs], outputs)

    async def _carry_out(self, step: Step) -> Any:
        """Do one I/O step of `submit_flow` (core.py) on ``redis.asyncio``."""
        if step.kind == "catalog":
            return await self.served_models()
        if step.kind == "depth":
            try:
                return int(await self.broker.llen(self.depth_key(step.arg)))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise broker_unavailable(self.settings, exc) from None
        if step.kind == "admit":
            with backend_errors(self.settings):
                return await functions.acall(self.backend, *step.arg)
        if step.kind == "payloads":
            with backend_errors(self.settings):
                return await arun_plan(self.backend, Plan(step.arg, lambda replies: None))
        if step.kind == "send":
            return await self._send(*step.arg)
        if step.kind == "markers":
            return await markers.awrite(self.backend, step.arg)
        if step.kind == "pin":
            return await barrier.apin(self.backend, [self.tenant]), shards.epoch(self.broker)
        if step.kind == "replicate":
            commands, (pinned, epoch) = step.arg
            replies = await arun_plan(self.broker, Plan(commands, lambda replies: replies))
            check_shard(self.broker, epoch)
            await barrier.aconfirm(self.backend, pinned, self.settings.redis_ha, "submit")
            return replies
        assert step.kind == "live", step
        return await self.live_workers()

    async def _send(self, sealed: list[Sealed], queue: str) -> None:
        """Push the queue entries (wire.py) and ring the wake-up list, as the sync client."""
        messages = self._wire.messages(self.tenant, sealed, queue)
        # One transaction: the jobs and their tenant's arrival (fetch.push) together.
        pipe = self.broker.pipeline(transaction=True)
        fetch.push(pipe, queue, self.tenant, messages, self.key_prefix)
        try:
            await pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            # One pipeline: whether it reached Redis before the connection broke is
            # not known (the broker was reachable a moment ago: the depth check).
            raise send_interrupted(self.settings, sealed) from None

    def job(self, job_id: str) -> AsyncJob:
        """A handle on an existing job of this client's tenant, by id (see `Client.job`)."""
        check_job_id(job_id)
        return AsyncJob(self, job_id)


class AsyncJob(JobCore):
    """One submitted job, followed from asyncio code (see `Job`: the same states and errors)."""

    client: AsyncClient
    #: The outcome `as_completed` learnt, so `result` needs no further round trip.
    _outcome: Outcome | None = None

    async def info(self) -> JobInfo:
        """The job's id, state, reason and model (see `Job.info`)."""
        with backend_errors(self.client.settings):
            return await arun_plan(self.client.backend, self.info_plan())

    async def status(self) -> JobState:
        """The job's state (see `Job.status`)."""
        return (await self.info()).state

    async def exists(self) -> bool:
        """Whether this tenant has a job of this id (see `Job.exists`)."""
        with backend_errors(self.client.settings):
            return await arun_plan(self.client.backend, self.exists_plan())

    async def cancel(self) -> bool:
        """Ask for the job to be cancelled; False if it had already finished (see `Job.cancel`)."""
        call = self.cancel_call()
        with backend_errors(self.client.settings):
            reply = await functions.acall(self.client.backend, *call)
        return self.cancel_reply(reply)

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the result and return the model's output; the errors are `Job.result`'s.

        Cancelling the task that awaits it stops the wait only: the job is
        left as it is (it runs, and its result can be read later).
        """
        if self._outcome is None:
            fut = self.client.waiter.watch(self)
            try:
                async with asyncio.timeout(timeout):
                    outcome = await fut
            except TimeoutError:
                fut.cancel()
                await self._timed_out(timeout)
            self._outcome = outcome
        if isinstance(self._outcome, ServiceUnavailable):
            outcome, self._outcome = self._outcome, None  # the next call tries again
            # Name the job: the caller may have no other record of its id.
            raise ServiceUnavailable(f"job {self.id}: {outcome}") from None
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    async def _timed_out(self, timeout: float | None) -> None:
        try:
            with backend_errors(self.client.settings):
                claim, suspect = await arun_plan(
                    self.client.backend,
                    Plan(
                        [("GET", self.claim_key()), ("EXISTS", self.suspect_key())],
                        lambda replies: replies,
                    ),
                )
                suspect = claim is None and bool(suspect)
                where = "" if suspect else await self.waiting()
        except ServiceUnavailable as exc:
            raise ServiceUnavailable(f"job {self.id}: {exc}") from None
        self.timed_out(timeout, suspect, where)

    async def waiting(self) -> str:
        """Where the job stands, for a wait that ends without its result (see `Job.waiting`)."""
        state = (await self.info()).state
        queued = state in (JobState.QUEUED, JobState.RUNNING)
        return self.waiting_text(state, await self.client.live_workers() if queued else None)


async def as_completed(
    jobs: Iterable[AsyncJob], *, timeout: float | None = None
) -> AsyncIterator[AsyncJob]:
    """Yield each job once it has ended, in the order they end.

    All of them are watched together (one read per batch of jobs, one
    ``BLPOP`` per lane of up to 256: waiter.py), not a task or a poll per job.
    ``await job.result()`` on a yielded job then returns (or raises) at once.
    Raises `ResultTimeout` if ``timeout`` seconds pass before all have ended.
    """
    jobs = list(jobs)
    ended: asyncio.Queue[AsyncJob] = asyncio.Queue()
    futures = []
    for job in jobs:
        if job._outcome is not None:
            ended.put_nowait(job)
            continue
        fut = job.client.waiter.watch(job)

        def done(f: asyncio.Future[Outcome], job: AsyncJob = job) -> None:
            if not f.cancelled():
                job._outcome = f.result()
                ended.put_nowait(job)

        fut.add_done_callback(done)
        futures.append(fut)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        for _ in jobs:
            try:
                # The deadline covers the waits only, not the caller's work between them.
                async with asyncio.timeout_at(deadline):
                    job = await ended.get()
            except TimeoutError:
                left = sum(1 for j in jobs if j._outcome is None)
                raise ResultTimeout(
                    f"{left} of {len(jobs)} jobs had not ended within {timeout:g} s"
                ) from None
            yield job
    finally:
        for fut in futures:
            fut.cancel()  # stop watching what the caller no longer waits for
