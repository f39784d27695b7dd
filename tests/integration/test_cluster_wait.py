"""``MAAS_REDIS_WAIT_REPLICAS`` on a Redis Cluster (#17): the durability barrier
(backend/barrier.py) on 3 primaries with a replica each, on loopback.

The barrier on its own (it confirms, it refuses a node that changed under the
writes); the whole pipeline with ``WAIT`` for the three kinds of producer and both
worker modes; and replicas that stop acknowledging (SIGSTOP): a submit fails within
the timeout naming its jobs, a worker hands its job back rather than trust an
unconfirmed result, and once the replicas are back every job is done, once.
The failover under load with ``WAIT``: tests/reliability/test_cluster_failover.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from maas_worker.backend import barrier, keyspace
from maas_worker.backend.redis import NotReplicated
from maas_worker.errors import ServiceUnavailable
from maas_worker.local.embedded import ClusterGroup
from maas_worker.settings import RedisHA

from ..reliability.conftest import assert_once, outcome_counts
from .conftest import WAIT_S, WORKER_MODES, Stack, wait_for
from .test_shards_cluster import KINDS, TENANTS, N, cluster, cluster_stack

# The fixtures of test_shards_cluster (a cluster for this module, a stack on it).
__all__ = ["cluster", "cluster_stack"]

pytestmark = pytest.mark.integration

WAIT = {"MAAS_REDIS_WAIT_REPLICAS": "1", "MAAS_REDIS_WAIT_TIMEOUT_MS": "2000"}


def start_workers(stack: Stack, mode: str, shards: range = range(N)) -> None:
    """Workers on ``shards`` in ``mode``: one batch consumer process per shard, or a
    Celery-task node per shard (it consumes exactly one)."""
    stack.worker_args = WORKER_MODES[mode]
    if mode == "batch":
        spec = ",".join(map(str, shards))
        stack.start_worker("b", concurrency=len(shards), args=("--shards", spec))
    else:
        for k in shards:
            stack.start_worker(f"c{k}", concurrency=1, args=("--shards", str(k)))


def test_the_barrier_confirms_on_each_node_and_refuses_a_changed_one(
    cluster: ClusterGroup, cluster_stack: Callable[..., Stack]
) -> None:
    stack = cluster_stack(**WAIT)
    r = stack.backend
    ha = RedisHA(wait_replicas=1, wait_timeout_ms=2000)
    tenants = [f"t{i}" for i in range(30)]
    pinned = barrier.pin(r, tenants)
    assert pinned is not None
    # Thirty tenants' slots span the three primaries: one barrier on each.
    assert len(set(pinned.values())) == N
    for tenant in tenants:
        r.set(keyspace.tenant_prefix(tenant) + "x", "1")
    barrier.confirm(r, pinned, ha, "test")
    for tenant, name in pinned.items():
        node = cluster.owner(keyspace.barrier(tenant))
        assert name.endswith(f":{node.port}")
    # A pin that names another node than the map's (a failover in between) is no
    # confirmation: the writes may have gone to a node that is gone.
    other = next(t for t in tenants if pinned[t] != pinned["t0"])
    wrong = {"t0": pinned[other]}
    with pytest.raises(NotReplicated, match="changed during the write"):
        barrier.confirm(r, wrong, ha, "test")
    # Nothing to do on one server (None: the WAIT rides in the writes' pipeline).
    barrier.confirm(r, None, ha, "test")


@pytest.mark.parametrize("mode", list(WORKER_MODES))
def test_the_whole_pipeline_runs_with_wait_on_the_cluster(
    cluster: ClusterGroup, cluster_stack: Callable[..., Stack], mode: str
) -> None:
    stack = cluster_stack(**WAIT)
    start_workers(stack, mode)
    for tenant in TENANTS:
        with stack.client(tenant, kind=KINDS[tenant]) as client:
            jobs = client.submit_many("echo", [{"t": tenant, "i": i} for i in range(5)])
            assert [j.result(timeout=WAIT_S) for j in jobs] == [
                {"echo": {"t": tenant, "i": i}} for i in range(5)
            ]
    assert "NotReplicated" not in stack.worker_logs()


# Each producer kind once and each worker mode at least once: a producer's refusal
# does not depend on the worker mode, nor a worker's hand-back on who submitted.
@pytest.mark.parametrize(
    ("kind", "mode", "hand_back"),
    [
        ("sync", "task", "NotReplicated; requeueing"),
        ("async", "batch", "NotReplicated; handing the unfinished jobs back"),
        ("gateway", "batch", "NotReplicated; handing the unfinished jobs back"),
    ],
)
def test_replica_lag_on_the_cluster_fails_submits_with_their_ids_and_loses_no_job(
    cluster: ClusterGroup,
    cluster_stack: Callable[..., Stack],
    mode: str,
    hand_back: str,
    kind: str,
) -> None:
    """Every replica stopped (SIGSTOP): the primaries answer, but none of their writes
    is confirmed. A submit fails within the wait's timeout with its job ids (the jobs
    are queued); the worker runs them, and hands them back rather than trust the
    unconfirmed results; thawed, every job is done once."""
    stack = cluster_stack(
        MAAS_REDIS_WAIT_REPLICAS="1", MAAS_REDIS_WAIT_TIMEOUT_MS="300", MAAS_LEASE_S="3"
    )
    start_workers(stack, mode, range(TENANTS["acme"], TENANTS["acme"] + 1))
    client = stack.client("acme", kind=kind)
    first = client.submit("echo", {"n": 0})
    assert first.result(timeout=WAIT_S) == {"echo": {"n": 0}}
    primaries = {n.port for n in cluster.primaries()}
    replicas = [n for n in cluster.running() if n.port not in primaries]
    assert replicas
    for node in replicas:
        node.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="0 of 1 replica") as caught:
            client.submit_many("echo", [{"n": 1}, {"n": 2}])
        refused_s = time.monotonic() - started
        assert refused_s < 5.0
        wait_for(lambda: hand_back in stack.worker_logs(), WAIT_S, "a hand-back")
    finally:
        for node in replicas:
            node.thaw()
    cluster.wait_ok()
    if kind == "gateway":
        # The gateway's 503 reaches its client without the ids (its text asks for
        # them all the same): the queued jobs are found through the worker's log.
        assert caught.value.job_ids == ()

        def others() -> set[str] | None:
            found = set(outcome_counts(stack.worker_logs())) - {first.id}
            return found if len(found) == 2 else None

        ids = wait_for(others, WAIT_S, "both jobs' outcome lines")
    else:
        ids = set(caught.value.job_ids)
        assert len(ids) == 2
    jobs = [client.job(j) for j in ids]
    assert sorted(j.result(timeout=WAIT_S)["echo"]["n"] for j in jobs) == [1, 2]
    # One run each: a result handed back unconfirmed is found at the next delivery
    # (``replayed``), never run a second time.
    assert_once(stack, [first, *jobs])
    client.close()
