"""Scenario 7 on a Redis Cluster: a primary killed under load, with ``WAIT`` (#17).

Three primaries with a replica each (`ClusterGroup`); the broker (3 queue shards,
each on its own primary) and the result store are the cluster, and
``MAAS_REDIS_WAIT_REPLICAS=1`` makes a submit return, and a worker acknowledge a
job, only once a replica holds the jobs (the result): on a cluster through the
durability barrier (backend/barrier.py). While producers submit and workers run
jobs, the primary serving a shard is SIGKILLed and its replica takes over; in one
variant the old primary comes back (empty) and rejoins as a replica, in the other
it stays down.

Checked, as for Sentinel (test_failover.py): the same worker processes
throughout; every accepted job has its result, run once; submits that failed say
so (`ServiceUnavailable` with the job ids) and each such job either never got in
or ran once; no audit record but a finished job's message delivered again
because its acknowledgement was lost with the killed primary (``replayed``).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from maas_worker.backend.audit import AuditLog
from maas_worker.backend.redis import backend_client
from maas_worker.broker import shards
from maas_worker.errors import UnknownJob
from maas_worker.local.embedded import ClusterGroup
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import save_keyring

from .conftest import SCALE, SIZE, Stack, assert_once, make_keyring, wait_for
from .test_redis_restart import WAIT_S, Producer

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

#: Queue shards, one per primary.
N = 3


@pytest.fixture
def cluster_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., tuple[Stack, ClusterGroup]]]:
    """Factory: ``cluster_stack(**env)`` -> (`Stack` on its own Redis Cluster, the cluster)."""
    made: list[tuple[Stack, ClusterGroup]] = []

    def factory(**extra_env: str) -> tuple[Stack, ClusterGroup]:
        tmp = tmp_path_factory.mktemp("cstack")
        group = ClusterGroup(primaries=N, replicas=1).start()
        keyring_path = tmp / "keyring.json"
        save_keyring(keyring_path, make_keyring())
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(
            {
                "MAAS_BROKER_URL": group.url,
                "MAAS_REDIS_CLUSTER": "1",
                "MAAS_REDIS_CLUSTER_NODES": group.seeds,
                "MAAS_QUEUE_SHARDS": str(N),
                "MAAS_KEYRING": str(keyring_path),
                "MAAS_DIAGNOSTIC_MODELS": "1",
                "MAAS_TENANT": "acme",
                "MAAS_MODEL_DIR": str(tmp / "models"),
                "MAAS_METRICS_PORT": "0",
                **extra_env,
            }
        )
        backend = backend_client(Settings.from_env(env))
        stack = Stack(group.url, tmp, keyring_path, env, backend)
        made.append((stack, group))
        return stack, group

    yield factory
    for stack, group in made:
        for w in stack.workers:
            w.stop(timeout_s=5)
        stack.backend.close()
        group.stop()


@pytest.mark.parametrize(
    "old_primary",
    [
        "returns",
        pytest.param(
            "stays_down",
            marks=pytest.mark.skipif(
                SCALE == "small",
                reason="full size only (make reliability): in make test the variant whose "
                "old primary returns covers the failover",
            ),
        ),
    ],
)
@pytest.mark.parametrize(
    "mode",
    [
        "celery",
        pytest.param(
            "batch",
            marks=pytest.mark.skipif(SCALE == "small", reason="full size only (make reliability)"),
        ),
    ],
)
def test_cluster_failover_under_load_with_wait_loses_nothing(
    cluster_stack: Any, report: Any, old_primary: str, mode: str
) -> None:
    """mode: Celery's task consumer (a node per shard), or the batch consumer (the default)."""
    visibility_s = 5
    stack, group = cluster_stack(
        MAAS_VISIBILITY_TIMEOUT_S=str(visibility_s),
        MAAS_LEASE_S="3",
        MAAS_REDIS_WAIT_REPLICAS="1",
        MAAS_REDIS_WAIT_TIMEOUT_MS="2000",
    )
    if mode == "batch":
        workers = [stack.start_worker(f"b{i}", concurrency=N) for i in range(2)]
    else:
        workers = [
            stack.start_worker(f"c{k}", concurrency=2, args=("--celery-tasks", "--shards", str(k)))
            for k in range(N)
        ]
    pids = [w.proc.pid for w in workers if w.proc is not None]
    # A dead primary that stays down leaves its shard's node without a replica: one
    # failover. Each round kills the primary of the next shard.
    failovers = SIZE.failovers if old_primary == "returns" else 1
    # Submitting until stopped: the load runs through each failover, not just up to it.
    producer = Producer(stack, 10**9)
    producer.start()
    per_round = SIZE.failover_jobs // (failovers + 1)
    took: list[float] = []

    def wait_accepted(n: int, what: str) -> None:
        wait_for(lambda: len(producer.accepted) >= n, WAIT_S, f"{n} accepted jobs ({what})")

    for i in range(failovers):
        wait_accepted((i + 1) * per_round, "before a kill")
        victim = group.owner(shards.prefix(i % N, sharded=True))
        victim.kill()
        killed_at = time.monotonic()
        group.wait_failover(victim)
        took.append(time.monotonic() - killed_at)
        if old_primary == "returns":
            victim.start()  # empty: it rejoins as a replica of its old replica
            group.wait_ok()
    wait_accepted(max(SIZE.failover_jobs, len(producer.accepted) + per_round // 2), "after")
    producer.stop.set()
    producer.join(WAIT_S * 2)
    assert not producer.is_alive()  # no submit hung
    assert producer.other_errors == []
    # The same worker processes throughout: they followed the failover on their own.
    assert [w.proc.pid for w in workers if w.proc is not None and w.proc.poll() is None] == pids
    jobs = producer.accepted
    for job in jobs:
        assert job.result(timeout=WAIT_S)["echo"]["n"] >= 0
    uncertain_ran = 0
    for job in producer.uncertain:
        try:
            job.status()
        except UnknownJob:
            continue  # never got in
        job.result(timeout=WAIT_S)
        uncertain_ran += 1
    counts = assert_once(stack, jobs)
    # The only audit records allowed, both ``replayed`` of an accepted job that ran
    # once: a finished job's message delivered again because its acknowledgement
    # was lost with the killed primary (one ``succeeded`` line, test_failover.py);
    # or a job whose result was stored but not confirmed (the barrier met the dead
    # node, or its replica did not answer in time): the worker handed it back
    # rather than acknowledge it, and its next delivery found it done (no
    # ``succeeded`` line, a hand-back logged). Anything else would be a false record.
    logs = stack.worker_logs()
    handed_back = logs.count("; requeueing") + logs.count("handing the unfinished jobs back")
    accepted = {j.id for j in jobs} | {j.id for j in producer.uncertain}
    records = AuditLog(stack.backend, maxlen=1000).latest(1000)

    def allowed(succeeded: int) -> bool:
        return succeeded == 1 or (succeeded == 0 and handed_back > 0)

    false_rows = [
        r
        for r in records
        if not (
            r.reason == "replayed"
            and r.job_id in accepted
            and allowed(counts.get(r.job_id, Counter())["succeeded"])
        )
    ]
    assert false_rows == []
    unconfirmed_then_replayed = sum(
        1 for r in records if counts.get(r.job_id, Counter())["succeeded"] == 0
    )
    report(
        jobs=len(jobs),
        failovers=failovers,
        old_primary=old_primary,
        mode=mode,
        failover_s=[round(t, 2) for t in took],
        refused_submits=producer.refused,
        slowest_submit_s=round(producer.slowest_call_s, 2),
        lost=0,
        duplicated=0,
        false_audit_rows=0,
        redelivered_after_lost_ack=len(records) - unconfirmed_then_replayed,
        stored_unconfirmed_then_replayed=unconfirmed_then_replayed,
        not_confirmed=len(producer.uncertain),
        not_confirmed_but_ran=uncertain_ran,
        hand_backs=handed_back,
    )
