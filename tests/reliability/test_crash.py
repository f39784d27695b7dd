"""Scenarios 1 and 2: workers killed (SIGKILL) or stopped (SIGTERM) with jobs in flight.

Promise: no accepted job is lost, each job has exactly one stored result
(its client reads that one, and it never changes), and a job whose result was
stored before its worker died is not run again when its message comes back.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest

from maas_worker.backend import keyspace
from maas_worker.broker.backlog import read_backlog
from maas_worker.client.job import Job
from maas_worker.local.processes import WorkerProcess

from .conftest import SIZE, TENANTS, Stack, assert_once, outcome_counts, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]
WAIT_S = 120.0
PRIORITIES = ("high", "normal", "low")
# Short enough that a dead worker's jobs come back within seconds.
FAST_RECOVERY = {"MAAS_VISIBILITY_TIMEOUT_S": "2", "MAAS_LEASE_S": "3"}


def submit_mixed(stack: Stack, n: int, seconds: float) -> list[Job]:
    """``n`` sleep jobs over every tenant and priority, submitted in batches."""
    clients = {t: stack.client(t) for t in TENANTS}
    combos = itertools.cycle(itertools.product(TENANTS, PRIORITIES))
    per: dict[tuple[str, str], int] = {}
    for _ in range(n):
        key = next(combos)
        per[key] = per.get(key, 0) + 1
    jobs: list[Job] = []
    for (tenant, priority), count in per.items():
        jobs += clients[tenant].submit_many(
            "sleep", [{"seconds": seconds} for _ in range(count)], priority=priority
        )
    return jobs


def settled(stack: Stack) -> bool:
    """Nothing queued, nothing reserved by a worker, no claim held by a live run."""
    r = stack.backend
    if read_backlog(r).total or r.hlen("unacked"):  # every list, the tenants' too
        return False
    return all(r.get(k) == b"done" for k in r.scan_iter(keyspace.claim("*", "*"), count=1000))


def collect(jobs: list[Job]) -> dict[str, bytes]:
    """Every job's result (all must succeed) and the sealed bytes its client read."""
    sealed: dict[str, bytes] = {}
    for job in jobs:
        out = job.result(timeout=WAIT_S)
        assert out["slept"] >= 0
        raw = job.client.backend.get(keyspace.result(job.tenant, job.id))
        assert raw is not None
        sealed[job.id] = raw
    return sealed


def check_once(stack: Stack, jobs: list[Job], sealed: dict[str, bytes]) -> dict[str, int]:
    """Exactly one stored result per job, never replaced, never a second completed run."""
    wait_for(lambda: settled(stack), WAIT_S, "queues, reservations and claims to settle")
    counts = assert_once(stack, jobs)
    for job in jobs:
        assert job.client.backend.get(keyspace.result(job.tenant, job.id)) == sealed[job.id]
    return {
        "replayed": sum(counts[j.id]["replayed"] for j in jobs),
        "rejected_other": sum(
            sum(c.values()) - c["succeeded"] - c["replayed"] for c in (counts[j.id] for j in jobs)
        ),
    }


def held_by(stack: Stack, worker: WorkerProcess) -> set[str]:
    """Jobs whose claim is held right now by a process of ``worker``."""
    import psutil

    assert worker.proc is not None
    pids = {worker.proc.pid} | {c.pid for c in psutil.Process(worker.proc.pid).children()}
    held = set()
    for key in stack.backend.scan_iter(keyspace.claim("*", "*"), count=1000):
        holder = (stack.backend.get(key) or b"").decode()
        parts = holder.split(":")
        if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) in pids:
            held.add(key.decode().rsplit(":", 1)[1])  # maas:{<tenant>}:claim:<job id>
    return held


def busy_or_done(stack: Stack, victim: WorkerProcess, batch: list[Job]) -> str | None:
    """ "busy" while ``victim`` holds a job and more than 3 of ``batch`` have ended,
    "done" once all of ``batch`` has, else None."""
    done = sum(1 for j in batch if stack.backend.exists(keyspace.result(j.tenant, j.id)))
    if done == len(batch):
        return "done"
    return "busy" if done > 3 and held_by(stack, victim) else None


def test_sigkill_under_load_loses_nothing_and_runs_each_job_once(
    make_stack: Any, report: Any
) -> None:
    stack, _ = make_stack(**FAST_RECOVERY)
    stack.start_worker("steady", concurrency=2)
    jobs: list[Job] = []
    killed_holding = 0
    for round_ in range(SIZE.kill_rounds):
        victim = stack.start_worker(f"victim{round_}", concurrency=2)
        # Kill it while it holds jobs and after some have finished. The steady
        # worker may take a whole batch before the victim takes any (a batch
        # consumer takes up to 64 at once): then the batch ends with the victim
        # holding nothing, and another batch is sent.
        for _attempt in range(5):
            batch = submit_mixed(stack, SIZE.kill_jobs, seconds=0.05)
            jobs += batch
            state = wait_for(
                lambda v=victim, b=batch: busy_or_done(stack, v, b),
                WAIT_S,
                "the victim to be busy or the batch to end",
            )
            if state == "busy":
                break
        else:
            pytest.fail("the victim held no job in 5 batches")
        killed_holding += len(held_by(stack, victim))
        victim.kill()
    sealed = collect(jobs)
    figures = check_once(stack, jobs, sealed)
    report(
        jobs=len(jobs),
        workers_killed=SIZE.kill_rounds,
        jobs_held_at_kill=killed_holding,
        lost=0,
        duplicated=0,
        **figures,
    )


def test_result_stored_before_the_crash_is_not_run_again(make_stack: Any, report: Any) -> None:
    """The worker dies after storing the result but before acking: the copy is not run."""
    stack, _ = make_stack(**FAST_RECOVERY)
    # Celery's pool: its main process acknowledges, a child stores (a batch consumer
    # does both: test_batch_consumer.py, test_sigkill_mid_batch_loses_nothing_...).
    # The rescuer runs the default mode: the copy is refused across modes too.
    doomed = stack.start_worker("doomed", concurrency=1, args=("--celery-tasks",))
    job = stack.client().submit("sleep", {"seconds": 1.0}, priority="high")
    wait_for(lambda: job.status() == "running", WAIT_S, "the job to start")
    assert doomed.proc is not None
    # Freeze the main process (it acks); its pool child finishes the job alone.
    os.kill(doomed.proc.pid, signal.SIGSTOP)
    try:
        # The pool child logs ``succeeded`` just after storing the result;
        # killing the group between the two would lose the line, not the job.
        wait_for(
            lambda: outcome_counts(doomed.log_path.read_text(errors="replace")).get(
                job.id, Counter()
            )["succeeded"],
            WAIT_S,
            "the result to be stored and logged",
        )
        assert stack.backend.exists(keyspace.result(job.tenant, job.id))
        assert stack.backend.hlen("unacked") == 1  # stored, never acknowledged
    finally:
        doomed.kill()  # SIGKILL reaches the stopped process too
    sealed = stack.backend.get(keyspace.result(job.tenant, job.id))
    assert job.result(timeout=WAIT_S)["slept"] >= 1.0
    stack.start_worker("rescuer", concurrency=1)
    # The message comes back after the visibility timeout and is refused.
    rec = stack.wait_audit(job.id, "replayed", timeout=WAIT_S)
    assert rec.verified
    wait_for(lambda: settled(stack), WAIT_S, "the redelivered copy to be consumed")
    counts = outcome_counts(stack.worker_logs())[job.id]
    assert counts["succeeded"] == 1 and counts["replayed"] == 1 and counts["duplicate"] == 0
    assert stack.backend.get(keyspace.result(job.tenant, job.id)) == sealed
    report(jobs=1, workers_killed=1, redelivered=1, run_again=0)


def test_sigterm_under_load_finishes_running_jobs_and_requeues_the_rest(
    make_stack: Any, report: Any
) -> None:
    # A visibility timeout far longer than the test: anything requeued got
    # back at once through the warm shutdown, not through the crash sweep.
    stack, _ = make_stack(MAAS_VISIBILITY_TIMEOUT_S="600", MAAS_LEASE_S="3")
    stopping = stack.start_worker("stopping", concurrency=2)
    jobs = submit_mixed(stack, SIZE.shutdown_jobs, seconds=0.3)
    held = wait_for(
        lambda: (
            held_by(stack, stopping)
            if sum(1 for j in jobs if stack.backend.exists(keyspace.result(j.tenant, j.id))) >= 2
            else None
        ),
        WAIT_S,
        "the worker to be running jobs",
    )
    assert stopping.proc is not None
    stopping.proc.send_signal(signal.SIGTERM)  # warm shutdown
    started = time.monotonic()
    stopping.proc.wait(WAIT_S)
    stop_s = time.monotonic() - started
    assert stopping.proc.returncode == 0
    # Every job it was running at SIGTERM was finished by it, not abandoned.
    finished_there = outcome_counts(stopping.log_path.read_text(errors="replace"))
    assert {j for j in held if not finished_there.get(j, {}).get("succeeded")} == set()
    # What was left goes to the next worker straight away (no sweep needed).
    stack.start_worker("next", concurrency=2)
    sealed = collect(jobs)
    figures = check_once(stack, jobs, sealed)
    report(
        jobs=len(jobs),
        running_at_sigterm=len(held),
        warm_shutdown_s=round(stop_s, 2),
        lost=0,
        duplicated=0,
        **figures,
    )
