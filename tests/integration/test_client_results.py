"""`Client.as_completed` and `Client.results`: many jobs waited for by batch, not by job.

Real Redis and a real batch consumer. The sync client's round trips are counted on the
server (``CLIENT LIST`` ``tot-cmds`` of its named connection), as the asyncio client's
are in test_async_client.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from maas_worker import Client, JobFailed, ResultTimeout

from .conftest import WAIT_S, Stack, wait_for

pytestmark = pytest.mark.integration

CLIENT_NAME = "maas-results-test"
JOBS = 1500


def _named(client: Client) -> Client:
    client.backend.connection_pool.connection_kwargs["client_name"] = CLIENT_NAME
    return client


def _our_commands(stack: Stack) -> int:
    total = 0
    for line in stack.backend.execute_command("CLIENT", "LIST").decode().splitlines():
        fields = dict(f.split("=", 1) for f in line.split(" ") if "=" in f)
        if fields.get("name") == CLIENT_NAME:
            total += int(fields["tot-cmds"])
    return total


def test_many_jobs_are_waited_for_by_batch_and_each_yielded_once(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    with _named(stack.client()) as client:
        jobs = []
        for start in range(0, JOBS, 500):
            jobs += client.submit_many("echo", [{"i": i} for i in range(start, start + 500)])
        failing = client.submit("sleep", {"seconds": "not a number"})  # bad_input
        everything = [*jobs, failing]
        before = _our_commands(stack)
        stack.start_worker("rs")  # batch consumers
        seen = [job.id for job in client.as_completed(everything, timeout=WAIT_S * 3)]
        waiting = _our_commands(stack) - before
        assert sorted(seen) == sorted(j.id for j in everything)  # each once
        # Each yielded job's result is in hand: no further command.
        outputs = [job.result() for job in jobs]
        assert [o["echo"]["i"] for o in outputs] == list(range(JOBS))
        with pytest.raises(JobFailed) as failed:
            failing.result()
        assert failed.value.reason == "bad_input"
        assert _our_commands(stack) - before == waiting
        # By batch: a BLPOP and an MGET per batch of jobs ended (up to 64 a batch
        # here), plus one re-read per second of waiting; one per job would be 1,500.
        assert waiting <= JOBS / 5, waiting
        # results(): outputs in order, the first failure raised.
        with pytest.raises(JobFailed):
            client.results(everything)
        assert client.results(jobs[:3]) == [{"echo": {"i": i}} for i in range(3)]


def test_a_wait_for_many_that_times_out_says_how_many_are_left(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    with stack.client() as client:
        jobs = client.submit_many("echo", [{"a": 1}, {"a": 2}])
        started = time.monotonic()
        with pytest.raises(ResultTimeout, match=r"^2 of 2 jobs had not ended within 0.5 s"):
            list(client.as_completed(jobs, timeout=0.5))
        assert 0.5 <= time.monotonic() - started < 5
        with pytest.raises(ValueError, match="this client only"), stack.client() as other:
            list(other.as_completed(jobs))


def test_one_client_waited_on_by_more_threads_than_connections_loses_no_job(
    make_stack: Callable[..., Stack],
) -> None:
    """150 threads each in `Job.result` on one `Client`: each holds a connection while it
    waits; past redis-py's default pool of 100 the 101st failed with ServiceUnavailable."""
    from concurrent.futures import ThreadPoolExecutor

    stack = make_stack()
    threads = 150
    with stack.client() as client:
        jobs = client.submit_many("echo", [{"i": i} for i in range(threads)])
        with ThreadPoolExecutor(threads) as pool:
            waits = [pool.submit(job.result, timeout=WAIT_S) for job in jobs]
            # Every thread is in its wait (a connection each) before a worker starts.
            wait_for(
                lambda: int(stack.backend.info("clients")["connected_clients"]) >= threads,
                WAIT_S,
                "every thread to wait on its own connection",
            )
            stack.start_worker("many")  # batch consumers
            outputs = [w.result() for w in waits]
    assert [o["echo"]["i"] for o in outputs] == list(range(threads))
