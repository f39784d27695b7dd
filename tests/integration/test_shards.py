"""Queue shards (#17): tenants placed by ``crc32(tenant) mod N``, nodes consuming sets of shards.

Real Valkey, real worker processes, both worker modes. One Redis with
``MAAS_QUEUE_SHARDS=3``: every broker key of shard K is under ``{maas-qK}``, a
tenant's jobs sit only in its shard's keys, a node consumes only the shards it
was given (``--shards``), and every job of every tenant runs exactly once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from maas_worker.broker import fetch, shards
from maas_worker.local.processes import WorkerProcess
from maas_worker.protocol import queue_for
from maas_worker.tenancy.keyring import TenantPolicy, load_keyring, save_keyring

from .conftest import WAIT_S, WORKER_MODES, Stack, wait_for

pytestmark = pytest.mark.integration

N = 3
#: Tenants and the shard the placement rule puts each on (checked below).
TENANTS = {"initech": 0, "globex": 1, "wayne": 1, "acme": 2}
#: How each tenant submits: every producer places by the same rule.
KINDS = {"initech": "sync", "globex": "async", "wayne": "gateway", "acme": "sync"}
JOBS_PER_TENANT = 12


def test_the_tenants_fall_on_the_shards_the_test_expects() -> None:
    assert {t: shards.shard_of(t, N) for t in TENANTS} == TENANTS


def ran_by(worker: WorkerProcess) -> set[str]:
    """The job ids whose outcome ``worker`` logged."""
    text = worker.log_path.read_text(errors="replace")
    return set(re.findall(r"job '([0-9a-f-]+)' succeeded\n", text))


def outcome_counts(stack: Stack) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in re.findall(r"job '([0-9a-f-]+)' \w+", stack.worker_logs()):
        counts[job_id] = counts.get(job_id, 0) + 1
    return counts


@pytest.mark.parametrize("mode", list(WORKER_MODES))
def test_tenants_on_different_shards_run_once_on_the_nodes_of_their_shard(
    make_stack: Callable[..., Stack], mode: str
) -> None:
    stack = make_stack(MAAS_QUEUE_SHARDS=str(N))
    stack.worker_args = WORKER_MODES[mode]
    ring = load_keyring(stack.keyring_path)
    for tenant in TENANTS:
        if tenant not in ring.tenants:
            ring = ring.with_new_tenant(tenant, TenantPolicy(("echo",), "normal"))
    save_keyring(stack.keyring_path, ring)

    # Shard 2's node first: the other shards' jobs wait in their own keys.
    last = stack.start_worker("s2", concurrency=1, args=("--shards", "2"))
    jobs: dict[str, list[str]] = {}
    for tenant in TENANTS:
        with stack.client(tenant, kind=KINDS[tenant]) as client:
            submitted = client.submit_many("echo", [{"i": i} for i in range(JOBS_PER_TENANT)])
            jobs[tenant] = [j.id for j in submitted]

    normal = queue_for("normal")

    def waiting() -> bool:
        return all(
            stack.backend.llen(shards.prefix(TENANTS[t], sharded=True) + f"{normal}.{t}")
            == JOBS_PER_TENANT
            for t in TENANTS
            if TENANTS[t] != 2
        )

    wait_for(waiting, WAIT_S, "the jobs of shards 0 and 1 to wait in their shard's lists")
    keys = sorted(k.decode() for k in stack.backend.keys("*"))
    for tenant, shard in TENANTS.items():
        holding = [k for k in keys if k.endswith(f".{tenant}") and normal in k]
        if shard != 2:  # shard 2's jobs may be taken already
            assert holding == [shards.prefix(shard, sharded=True) + f"{normal}.{tenant}"]
        else:
            assert all(k.startswith("{maas-q2}") for k in holding)
    # No broker key outside a shard: the queues, rings, arrivals, wake-up list,
    # kombu's unacked hash and bindings all carry their shard's tag.
    broker_keys = [
        k
        for k in keys
        if k.startswith(("maas.", "maas:ring", "maas:arrivals", "maas:wake", "maas:weights"))
        or k.startswith(("unacked", "_kombu"))
    ]
    assert broker_keys == []
    assert stack.backend.exists("{maas-q2}" + fetch.WEIGHTS_KEY) == 0  # every weight 1
    # The monitors sum the shards: shards 0 and 1 hold 36 jobs, shard 2 up to 12.
    stats = json.loads(stack.cli("stats", "--json").stdout)
    assert 3 * JOBS_PER_TENANT <= stats["backlog"]["normal"] <= 4 * JOBS_PER_TENANT
    assert stats["backlog_by_tenant"]["normal"]["initech"] == JOBS_PER_TENANT
    assert stats["backlog_by_tenant"]["normal"]["wayne"] == JOBS_PER_TENANT

    if mode == "batch":
        # One node consumes two shards with two consumer processes.
        first = [stack.start_worker("s01", concurrency=2, args=("--shards", "0,1"))]
    else:
        # A Celery-task node consumes exactly one shard.
        first = [
            stack.start_worker("s0", concurrency=1, args=("--shards", "0")),
            stack.start_worker("s1", concurrency=1, args=("--shards", "1")),
        ]
    for tenant, ids in jobs.items():
        with stack.client(tenant, kind=KINDS[tenant]) as client:
            for job_id in ids:
                assert client.job(job_id).result(timeout=WAIT_S)["echo"]["i"] >= 0

    everything = {j for ids in jobs.values() for j in ids}
    counts = wait_for(
        lambda: (c := outcome_counts(stack)) and everything <= set(c) and c,
        WAIT_S,
        "every job's outcome line",
    )
    assert {j: counts[j] for j in everything} == dict.fromkeys(everything, 1)
    # Each node ran only the jobs of the shards it was given.
    assert ran_by(last) == set(jobs["acme"])
    assert set().union(*(ran_by(w) for w in first)) == everything - set(jobs["acme"])
    if mode == "task":
        assert ran_by(first[0]) == set(jobs["initech"])


def test_a_node_needs_a_consumer_process_per_shard_and_celery_tasks_one_shard(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(MAAS_QUEUE_SHARDS=str(N))
    few = stack.cli("worker", "--concurrency", "2")
    assert few.returncode != 0
    assert "2 batch consumer process(es) cannot consume 3 queue shards" in few.stderr
    many = stack.cli("worker", "--celery-tasks", "--shards", "0-1")
    assert many.returncode != 0
    assert "consumes exactly one queue shard, not 2" in many.stderr
    bad = stack.cli("worker", "--shards", "3")
    assert bad.returncode != 0
    assert "shard 3 does not exist" in bad.stderr


def test_flowers_queue_counts_sum_every_shard(make_stack: Callable[..., Stack]) -> None:
    import asyncio

    from maas_worker.monitoring.flowerbroker import sharded_queue_lengths

    stack = make_stack(MAAS_QUEUE_SHARDS=str(N))
    settings = stack.settings
    for tenant, shard in TENANTS.items():
        pipe = stack.backend.pipeline(transaction=True)
        fetch.push(
            pipe,
            queue_for("normal"),
            tenant,
            ["{}"] * (shard + 1),
            shards.prefix(shard, sharded=True),
        )
        pipe.execute()

    class FlowerBroker:  # what Flower's RedisBase offers queue_lengths
        priority_steps = fetch.PRIORITY_STEPS

        @staticmethod
        def _q_for_pri(queue: str, pri: int) -> str:
            return queue if pri == 0 else f"{queue}{fetch.PRIORITY_SEP}{pri}"

    counts = asyncio.run(
        sharded_queue_lengths(settings, FlowerBroker(), [queue_for("normal"), queue_for("low")])
    )
    assert counts == [
        {"name": queue_for("normal"), "messages": sum(k + 1 for k in TENANTS.values())},
        {"name": queue_for("low"), "messages": 0},
    ]
