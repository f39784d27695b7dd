"""Scenario 7: Redis Sentinel failover under load (issue #17, docs/scaling.md).

A primary, two replicas and three sentinels (`SentinelGroup`); the broker and
the result store are ``sentinel://`` URLs, and ``MAAS_REDIS_WAIT_REPLICAS=1``
makes a submit return, and a worker acknowledge a job, only once a replica
holds the jobs (the result). While producers submit and two workers run jobs,
the primary is SIGKILLed; the sentinels promote a replica. In one variant the
old primary comes back (empty: no persistence) and the sentinels turn it into
a replica of the new one: the case where, with a fixed address, its ~10 s as
an empty primary lost 400 jobs and stopped both workers on ``READONLY``.

Checked: the same worker processes throughout (no restart, none stopped);
every accepted job has its result, run once; submits that failed say so
(`ServiceUnavailable` with the job ids) and each such job either never got in
or ran once; no audit record (no job was refused as forged or replayed by
mistake).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from maas_worker import ServiceUnavailable
from maas_worker.backend.audit import AuditLog
from maas_worker.backend.redis import backend_client
from maas_worker.local.embedded import DEFAULT_MASTER_NAME, EmbeddedRedis, SentinelGroup
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import save_keyring

from .conftest import SCALE, SIZE, TENANTS, Stack, assert_once, make_keyring, wait_for
from .test_redis_restart import WAIT_S, Producer, completed_once, settled

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@pytest.fixture
def sentinel_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., tuple[Stack, SentinelGroup]]]:
    """Factory: ``sentinel_stack(**env)`` -> (`Stack` on ``sentinel://``, its `SentinelGroup`)."""
    made: list[tuple[Stack, SentinelGroup]] = []

    def factory(**extra_env: str) -> tuple[Stack, SentinelGroup]:
        tmp = tmp_path_factory.mktemp("sstack")
        # Passwords on the data nodes and the sentinels, as in production.
        group = SentinelGroup(
            replicas=2, sentinels=3, password="node-pw", sentinel_password="sentinel-pw"
        ).start()
        keyring_path = tmp / "keyring.json"
        save_keyring(keyring_path, make_keyring())
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(
            {
                "MAAS_BROKER_URL": group.url(),
                "MAAS_REDIS_SENTINEL_MASTER": DEFAULT_MASTER_NAME,
                "MAAS_REDIS_SENTINEL_PASSWORD": "sentinel-pw",
                "MAAS_KEYRING": str(keyring_path),
                "MAAS_DIAGNOSTIC_MODELS": "1",
                "MAAS_TENANT": TENANTS[0],
                "MAAS_MODEL_DIR": str(tmp / "models"),
                "MAAS_METRICS_PORT": "0",
                **extra_env,
            }
        )
        backend = backend_client(Settings.from_env(env))
        stack = Stack(group.url(), tmp, keyring_path, env, backend)
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
def test_sentinel_failover_under_load_loses_nothing(
    sentinel_stack: Any, report: Any, old_primary: str, mode: str
) -> None:
    """mode: Celery's task consumer (``--celery-tasks``), or the batch consumer (the default)."""
    visibility_s = 5
    stack, group = sentinel_stack(
        MAAS_VISIBILITY_TIMEOUT_S=str(visibility_s),
        MAAS_LEASE_S="3",
        MAAS_REDIS_WAIT_REPLICAS="1",
        MAAS_REDIS_WAIT_TIMEOUT_MS="2000",
    )
    args = () if mode == "batch" else ("--celery-tasks",)
    workers = [stack.start_worker(f"f{i}", concurrency=2, args=args) for i in range(2)]
    pids = [w.proc.pid for w in workers if w.proc is not None]
    # A dead primary that stays down leaves one replica: one failover.
    failovers = SIZE.failovers if old_primary == "returns" else 1
    producer = Producer(stack, SIZE.failover_jobs)
    producer.start()
    per_round = SIZE.failover_jobs // (failovers + 1)
    took: list[float] = []
    demoted: list[float] = []  # from the old primary's return to its being a replica
    for i in range(failovers):
        wait_for(
            lambda n=(i + 1) * per_round: len(producer.accepted) >= n,
            WAIT_S,
            f"{(i + 1) * per_round} accepted jobs",
        )
        old = group.primary()
        old.kill()
        killed_at = time.monotonic()
        new = group.wait_failover(old.port)
        took.append(time.monotonic() - killed_at)
        assert new is not old
        if old_primary == "returns":
            old.start()  # empty: the data nodes keep nothing on disk
            back_at = time.monotonic()
            group.wait_role(old, "slave")
            demoted.append(time.monotonic() - back_at)
    producer.join(WAIT_S * 2)
    assert not producer.is_alive()  # no submit hung
    assert producer.other_errors == []
    jobs, uncertain_ran, counts = completed_once(stack, producer, workers, pids, visibility_s)
    wait_for(lambda: settled(stack), WAIT_S, "queues drained")
    # The only audit records allowed: a finished job's message delivered again
    # because its acknowledgement was lost with the killed primary (the result,
    # written and confirmed before it, was not), refused as ``replayed``. The
    # worker cannot tell that copy from a Redis writer's replay of it, so it
    # audits it (docs/scaling.md). Anything else (a job refused as forged,
    # expired or malformed) would be a false record.
    accepted = {j.id for j in jobs} | {j.id for j in producer.uncertain}
    records = AuditLog(stack.backend, maxlen=1000).latest(1000)
    false_rows = [
        r
        for r in records
        if not (
            r.reason == "replayed"
            and r.job_id in accepted
            and counts.get(r.job_id, Counter())["succeeded"] == 1
        )
    ]
    assert false_rows == []
    report(
        jobs=len(jobs),
        failovers=failovers,
        old_primary=old_primary,
        mode=mode,
        failover_s=[round(t, 2) for t in took],
        old_primary_demoted_after_s=[round(t, 1) for t in demoted],
        refused_submits=producer.refused,
        slowest_submit_s=round(producer.slowest_call_s, 2),
        lost=0,
        duplicated=0,
        false_audit_rows=0,
        redelivered_after_lost_ack=len(records),
        not_confirmed=len(producer.uncertain),
        not_confirmed_but_ran=uncertain_ran,
        requeued_by_workers=stack.worker_logs().count("; requeueing"),
    )


def test_demoted_primary_on_a_fixed_address_is_a_reconnect(make_stack: Any, report: Any) -> None:
    """A ``redis://`` server that becomes a replica (a failover behind a fixed address):
    submits fail with `ServiceUnavailable` (not ``ReadOnlyError``), the worker keeps
    running (it stopped on "Unrecoverable error: ReadOnlyError"), and once the address
    is a primary again both carry on with no restart."""
    stack, _ = make_stack()
    # Celery's consumer: its poll and takes, and kombu's "read only replica" lines
    # (a batch consumer retries too, under its own log lines: not checked here).
    worker = stack.start_worker("ro", concurrency=1, args=("--celery-tasks",))
    client = stack.client("acme")
    assert client.submit("echo", {"n": 1}).result(timeout=WAIT_S)["echo"]["n"] == 1
    with EmbeddedRedis() as other:
        stack.backend.execute_command("REPLICAOF", "127.0.0.1", str(other.port))
        wait_for(
            lambda: stack.backend.execute_command("ROLE")[3] == b"connected",
            WAIT_S,
            "the demoted server to sync",
        )
        with pytest.raises(ServiceUnavailable):
            client.submit("echo", {"n": 2})
        # The worker's poll is cut (UNBLOCKED) and its takes meet READONLY: wait
        # until it has been retrying a while, then bring the primary back.
        wait_for(
            lambda: stack.worker_logs().count("read only replica") >= 3,
            WAIT_S,
            "the worker to retry against the replica",
        )
        stack.backend.execute_command("REPLICAOF", "NO", "ONE")
    assert worker.proc is not None and worker.proc.poll() is None
    assert "Unrecoverable error" not in stack.worker_logs()
    assert client.submit("echo", {"n": 3}).result(timeout=WAIT_S)["echo"]["n"] == 3
    report(worker_restarts=0)


@pytest.mark.parametrize(
    ("args", "hand_back"),
    [
        (("--celery-tasks",), "NotReplicated; requeueing"),
        ((), "NotReplicated; handing the unfinished jobs back"),
    ],
    ids=["task", "batch"],
)
def test_replica_lag_fails_submits_with_their_ids_and_loses_no_job(
    sentinel_stack: Any, report: Any, args: tuple[str, ...], hand_back: str
) -> None:
    """Replicas that stop acknowledging (SIGSTOP: replication lag without end), with
    ``MAAS_REDIS_WAIT_REPLICAS=1``: a submit fails within the wait's timeout, naming
    its jobs (queued on the primary all the same), never a hang; a worker that ran
    such a job hands it back rather than trusting the unconfirmed result; once the
    replicas catch up every job is done, once."""
    stack, group = sentinel_stack(
        MAAS_REDIS_WAIT_REPLICAS="1", MAAS_REDIS_WAIT_TIMEOUT_MS="300", MAAS_LEASE_S="3"
    )
    stack.start_worker("lag", concurrency=1, args=args)
    client = stack.client("acme")
    first = client.submit("echo", {"n": 0})
    assert first.result(timeout=WAIT_S) == {"echo": {"n": 0}}
    replicas = group.replicas()
    for node in replicas:
        node.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="0 of 1 replica") as caught:
            client.submit_many("echo", [{"n": 1}, {"n": 2}])
        refused_s = time.monotonic() - started
        assert refused_s < 5.0
        assert len(caught.value.job_ids) == 2
        wait_for(lambda: hand_back in stack.worker_logs(), WAIT_S, "a hand-back")
    finally:
        for node in replicas:
            node.thaw()
    group.wait_replicated()
    jobs = [client.job(j) for j in caught.value.job_ids]
    assert sorted(j.result(timeout=WAIT_S)["echo"]["n"] for j in jobs) == [1, 2]
    assert_once(stack, [first, *jobs])
    report(refused_submit_s=round(refused_s, 2), lost=0, duplicated=0)
