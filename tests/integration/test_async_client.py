"""What only the asyncio client has: many awaits on one loop, cancelled awaits, its wire format.

The behaviours it shares with `Client` are checked by the client's own tests,
which run against both, and through the gateway (``client_kind``: test_pipeline.py,
test_submit_many.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from maas_worker import AsyncClient, JobCancelled, ResultTimeout, as_completed
from maas_worker.backend import keyspace
from maas_worker.broker import fetch
from maas_worker.client import waiter
from maas_worker.protocol import queue_for
from maas_worker.tenancy.cancellation import make_token
from maas_worker.tenancy.keyring import load_keyring

from .conftest import WAIT_S, Stack

pytestmark = pytest.mark.integration

#: Jobs awaited together in the concurrency test (the benchmark runs 10,000:
#: docs/benchmarks.md); 2,000 keeps this test to seconds on a 2-core runner.
CONCURRENT_JOBS = int(os.environ.get("MAAS_ASYNC_TEST_JOBS", "2000"))
#: Our connections' name on the server, to count the commands they sent.
CLIENT_NAME = "maas-async-test"


def _named(client: AsyncClient) -> AsyncClient:
    for r in (client.backend, client.broker):
        r.connection_pool.connection_kwargs["client_name"] = CLIENT_NAME
    return client


def _our_commands(stack: Stack) -> int:
    """Commands our named connections have sent (CLIENT LIST ``tot-cmds``, pipelines counted
    command by command)."""
    total = 0
    for line in stack.backend.execute_command("CLIENT", "LIST").decode().splitlines():
        fields = dict(f.split("=", 1) for f in line.split(" ") if "=" in f)
        if fields.get("name") == CLIENT_NAME:
            total += int(fields["tot-cmds"])
    return total


def _masked(raw: bytes) -> dict[str, Any]:
    """A queued message with the parts that differ per job or per process blanked."""
    msg: dict[str, Any] = json.loads(raw)
    for part, keys in (
        ("headers", ("id", "root_id", "origin")),
        ("properties", ("correlation_id", "reply_to", "delivery_tag")),
    ):
        for key in keys:
            assert isinstance(msg[part][key], str) and msg[part][key]
            msg[part][key] = "*"
    msg["body"] = "*"  # the envelope (its own tests compare what it seals)
    return msg


def test_its_messages_are_the_sync_clients_byte_for_byte_but_the_ids(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.client().submit("echo", {"a": 1}, priority="high")
    sync_raw = stack.backend.rpop(stack.tenant_queue("high"))

    async def submit() -> str:
        async with stack.async_client() as client:
            return (await client.submit("echo", {"a": 1}, priority="high")).id

    job_id = asyncio.run(submit())
    async_raw = stack.backend.rpop(stack.tenant_queue("high"))
    assert json.loads(async_raw)["headers"]["id"] == job_id
    assert list(json.loads(async_raw)) == list(json.loads(sync_raw))  # same key order too
    assert _masked(async_raw) == _masked(sync_raw)
    # Both pushed to the tenant's list, announced it (fair share), rang the wake-up
    # list and wrote the queued marker.
    assert stack.backend.smembers(fetch.arrivals_key(queue_for("high"))) == {b"acme"}
    assert json.loads(sync_raw)["properties"][fetch.TENANT_PROPERTY] == "acme"
    assert stack.backend.llen("maas:wake") >= 2
    assert stack.backend.exists(keyspace.submitted("acme", job_id))


def test_cancelling_the_awaiting_task_leaves_the_job_to_run(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.start_worker()

    async def scenario() -> None:
        async with stack.async_client() as client:
            job = await client.submit("sleep", {"seconds": 1.5})
            waiting = asyncio.create_task(job.result(timeout=WAIT_S))
            while await job.status() != "running":
                await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # Only the wait was cancelled: no cancel request, the job still runs.
            assert not stack.backend.exists(keyspace.cancel("acme", job.id))
            assert await job.status() == "running"
            assert (await job.result(timeout=WAIT_S))["slept"] >= 1.5
            assert await job.status() == "succeeded"
            # And the job's own cancel still works, on another job.
            other = await client.submit("sleep", {"seconds": 30})
            assert await other.cancel() is True
            with pytest.raises(JobCancelled):
                await other.result(timeout=WAIT_S)

    asyncio.run(scenario())


def test_a_wait_that_times_out_says_where_the_job_stands(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()

    async def scenario() -> None:
        async with stack.async_client() as client:
            job = await client.submit("echo", {"a": 1})
            started = time.monotonic()
            with pytest.raises(ResultTimeout, match="still queued and no worker is consuming"):
                await job.result(timeout=0.5)
            assert 0.5 <= time.monotonic() - started < 5
            with pytest.raises(ResultTimeout, match=r"^1 of 1 jobs had not ended within 0.3 s"):
                async for _ in as_completed([job], timeout=0.3):
                    pass

    asyncio.run(scenario())


def test_thousands_of_jobs_awaited_from_one_loop_without_a_thread_each(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.start_worker(concurrency=2)
    n = CONCURRENT_JOBS

    async def scenario() -> tuple[int, int, int]:
        async with stack.async_client() as client:
            _named(client)
            threads_before = threading.active_count()
            jobs = []
            for start in range(0, n, 500):
                jobs += await client.submit_many(
                    "echo", [{"i": i} for i in range(start, min(n, start + 500))]
                )
            submitted = _our_commands(stack)
            most_threads = threads_before

            async def watch_threads() -> None:
                nonlocal most_threads
                while True:
                    most_threads = max(most_threads, threading.active_count())
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch_threads())
            # Half awaited one coroutine each (gather), half with as_completed.
            half = n // 2
            outputs = await asyncio.gather(*(j.result(timeout=WAIT_S * 3) for j in jobs[:half]))
            assert [o["echo"]["i"] for o in outputs] == list(range(half))
            seen = set()
            async for job in as_completed(jobs[half:], timeout=WAIT_S * 3):
                seen.add((await job.result())["echo"]["i"])
            assert seen == set(range(half, n))
            watcher.cancel()
            return threads_before, most_threads, _our_commands(stack) - submitted

    threads_before, most_threads, waiting_commands = asyncio.run(scenario())
    assert most_threads == threads_before
    # Waiting: one MGET per batch of jobs read, at most one BLPOP wake per job, and
    # per lane (up to 256 jobs) a BLPOP and an MGET every 5 s: about two commands per
    # job at worst, however many jobs are awaited (a poll per job would be one per
    # job per poll interval).
    assert waiting_commands / n <= 3, waiting_commands / n


def test_an_outcome_whose_wake_up_another_waiter_took_is_found_by_the_recheck(
    make_stack: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = make_stack()
    monkeypatch.setattr(waiter, "RECHECK_S", 0.5)

    async def scenario() -> float:
        async with stack.async_client() as client:
            job = await client.submit("echo", {"a": 1})
            waiting = asyncio.create_task(job.result(timeout=WAIT_S))
            await asyncio.sleep(0.2)
            # The job's own cancel request, with no push to its done list: as if
            # another waiter of the job had popped the element meant for this one.
            token = make_token(load_keyring(stack.keyring_path), "acme", job.id)
            stack.backend.set(keyspace.cancel("acme", job.id), token)
            started = time.monotonic()
            with pytest.raises(JobCancelled):
                await waiting
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 3 * waiter.RECHECK_S + 1


def test_a_large_request_travels_by_claim_check(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(MAAS_MAX_INPUT_BYTES=str(4 << 20), MAAS_MAX_RESULT_BYTES=str(8 << 20))
    big = {"text": "y" * (1 << 20)}

    async def scenario() -> None:
        async with stack.async_client() as client:
            job = await client.submit("echo", big)
            raw = stack.backend.lindex(stack.tenant_queue("normal"), 0)
            assert raw is not None and len(raw) < 8192  # the message only points at it
            assert stack.backend.strlen(keyspace.payload("acme", job.id)) > 1 << 20
            stack.start_worker()
            assert await job.result(timeout=WAIT_S) == {"echo": big}
            assert not stack.backend.exists(keyspace.payload("acme", job.id))

    asyncio.run(scenario())
