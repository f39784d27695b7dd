"""Queue shards on a real Redis Cluster (#17): 3 primaries with a replica each, on loopback.

The broker and the result store are the cluster (``MAAS_REDIS_CLUSTER=1``, 3
shards whose hash tags land on 3 different primaries); each shard's
connections go to the primary serving its slot, the result store's go through
redis-py's cluster client. Whole pipeline: submit, worker, result; then a
primary owning a shard is killed under load: its replica takes over, workers
and producers reconnect, nothing accepted is lost and nothing runs twice.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from maas_worker import Client
from maas_worker.backend.redis import backend_client
from maas_worker.broker import shards
from maas_worker.errors import ServiceUnavailable
from maas_worker.local.embedded import ClusterGroup
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import TenantPolicy, save_keyring

from .conftest import WAIT_S, WORKER_MODES, Stack, make_keyring, wait_for

pytestmark = pytest.mark.integration

N = 3
TENANTS = {"initech": 0, "globex": 1, "acme": 2}
#: How each tenant submits (sync and asyncio pinned connections, the gateway's pools).
KINDS = {"initech": "sync", "globex": "async", "acme": "gateway"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterGroup]:
    group = ClusterGroup(primaries=3, replicas=1).start()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def cluster_stack(
    cluster: ClusterGroup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Stack]]:
    made: list[Stack] = []

    def factory(**extra: str) -> Stack:
        tmp = tmp_path_factory.mktemp("cluster")
        keyring_path = tmp / "keyring.json"
        ring = make_keyring()
        for tenant in TENANTS:
            if tenant not in ring.tenants:
                ring = ring.with_new_tenant(tenant, TenantPolicy(("echo", "sleep"), "normal"))
        save_keyring(keyring_path, ring)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(
            {
                "MAAS_BROKER_URL": cluster.url,
                "MAAS_REDIS_CLUSTER": "1",
                "MAAS_REDIS_CLUSTER_NODES": cluster.seeds,
                "MAAS_QUEUE_SHARDS": str(N),
                "MAAS_KEYRING": str(keyring_path),
                "MAAS_DIAGNOSTIC_MODELS": "1",
                "MAAS_TENANT": "acme",
                "MAAS_MODEL_DIR": str(tmp / "models"),
                **extra,
            }
        )
        settings = Settings.from_env(env)
        backend = backend_client(settings)
        # A fresh deployment on the module's cluster: no keys of an earlier test.
        for node in cluster.primaries():
            with redis.Redis(port=node.port) as client:
                client.flushall()
        stack = Stack(cluster.url, Path(tmp), keyring_path, env, backend)  # type: ignore[arg-type]
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        stack.stop_gateway()
        for w in stack.workers:
            w.stop(timeout_s=5)
        stack.backend.close()


def test_the_shards_tags_land_on_different_primaries(cluster: ClusterGroup) -> None:
    owners = {cluster.owner(shards.prefix(k, sharded=True)).port for k in range(N)}
    assert len(owners) == N


@pytest.mark.parametrize("mode", list(WORKER_MODES))
def test_the_whole_pipeline_runs_on_the_cluster(
    cluster: ClusterGroup, cluster_stack: Callable[..., Stack], mode: str
) -> None:
    stack = cluster_stack()
    stack.worker_args = WORKER_MODES[mode]
    if mode == "batch":
        stack.start_worker("c", concurrency=N)  # one consumer process per shard
    else:
        for k in range(N):  # a Celery-task node consumes one shard
            stack.start_worker(f"c{k}", concurrency=1, args=("--shards", str(k)))
    for tenant in TENANTS:
        with stack.client(tenant, kind=KINDS[tenant]) as client:
            jobs = client.submit_many("echo", [{"t": tenant, "i": i} for i in range(5)])
            assert [j.result(timeout=WAIT_S) for j in jobs] == [
                {"echo": {"t": tenant, "i": i}} for i in range(5)
            ]
    # Each shard's take ran on the primary serving its tag: all three took.
    for k in range(N):
        owner = cluster.owner(shards.prefix(k, sharded=True))
        with redis.Redis(port=owner.port) as node:
            stats = node.info("commandstats")
        takes = sum(stats.get(c, {}).get("calls", 0) for c in ("cmdstat_eval", "cmdstat_evalsha"))
        assert takes > 0, owner.port


def test_a_primary_killed_under_load_loses_nothing_and_runs_nothing_twice(
    cluster: ClusterGroup, cluster_stack: Callable[..., Stack]
) -> None:
    stack = cluster_stack()
    stack.start_worker("k", concurrency=N)
    victim = cluster.owner(shards.prefix(TENANTS["acme"], sharded=True))
    accepted: dict[str, list[str]] = {t: [] for t in TENANTS}
    stop = threading.Event()
    errors: list[str] = []

    def produce(tenant: str) -> None:
        settings = Settings.from_env({**stack.env, "MAAS_TENANT": tenant})
        with Client(settings=settings) as client:
            while not stop.is_set():
                try:
                    jobs = client.submit_many("echo", [{"n": n} for n in range(4)])
                except ServiceUnavailable as exc:  # refused or not known: not accepted
                    errors.append(type(exc).__name__)
                    stop.wait(0.2)
                    continue
                accepted[tenant] += [j.id for j in jobs]
                stop.wait(0.02)  # steady load, not a flood of the 2-core test machine

    producers = [threading.Thread(target=produce, args=(t,)) for t in TENANTS]
    for p in producers:
        p.start()
    wait_for(lambda: len(accepted["acme"]) >= 40, WAIT_S, "jobs accepted before the kill")
    victim.kill()
    cluster.wait_failover(victim)
    before = len(accepted["acme"])
    wait_for(
        lambda: len(accepted["acme"]) >= before + 40, WAIT_S, "jobs accepted after the failover"
    )
    stop.set()
    for p in producers:
        p.join()

    everything = {j for ids in accepted.values() for j in ids}
    for tenant, ids in accepted.items():
        with Client(settings=Settings.from_env({**stack.env, "MAAS_TENANT": tenant})) as client:
            for job_id in ids:
                client.job(job_id).result(timeout=WAIT_S)

    # Every job accepted was run once: one `succeeded` line (and a `replayed` one
    # if its acknowledgement was lost with the primary: redelivered, refused as done).
    pattern = re.compile(r"job '([0-9a-f-]+)' (succeeded|replayed)\n")

    def outcomes() -> dict[str, list[str]] | None:
        found: dict[str, list[str]] = {}
        for job_id, outcome in pattern.findall(stack.worker_logs()):
            found.setdefault(job_id, []).append(outcome)
        return found if everything <= set(found) else None

    ran = wait_for(outcomes, WAIT_S, "every accepted job's outcome line")
    assert [j for j in everything if ran[j].count("succeeded") > 1] == []
    assert [j for j in everything if "succeeded" not in ran[j]] == []
    # The killed primary comes back, as a replica of its old replica.
    victim.start()
    cluster.wait_ok()
