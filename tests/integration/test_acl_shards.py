"""Least-privilege Redis roles in a deployment with queue shards (#17).

One server per module with ``MAAS_QUEUE_SHARDS=3``, started with the
``users.acl`` that `acl.generate` writes for that layout (every broker key,
channel and selector under each shard's ``{maas-qK}`` prefix). Two nodes with
the worker role: a batch-consumer node on shards 0-1 and a ``--celery-tasks``
node on shard 2, so every tenant's jobs run in the mode of its shard's node.
Every other process has its own role: producers (sync, asyncio, the gateway),
beat, the fleet exporter and ``stats`` (monitor), Flower. Then a producer is
refused another tenant's list on its own shard, and its own tenant's lists on
another shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from maas_worker import AsyncClient, as_completed
from maas_worker.backend import keyspace
from maas_worker.broker import fetch, shards
from maas_worker.local.embedded import free_port
from maas_worker.local.processes import WorkerProcess
from maas_worker.protocol import queue_for
from maas_worker.settings import Settings
from maas_worker.tenancy import acl
from maas_worker.tenancy.keyring import Keyring, save_keyring

from .conftest import Stack, wait_for
from .services import Service, http_get
from .test_acl import ACME_POLICY, FLOWER_AUTH, Deployment, _start_server, denials

pytestmark = pytest.mark.integration
WAIT_S = 60.0
N = 3
#: Tenants and their shard (crc32 mod 3; checked below): one per shard.
TENANTS = {"initech": 0, "globex": 1, "acme": 2}
LAYOUT = acl.ShardLayout(N, sharded=True)
#: A producer's one refusal by design (`test_acl.PROBE`): its task-sent event.
PROBES = {(acl.producer(t), "command", "publish") for t in TENANTS}


def test_the_tenants_fall_on_the_shards_the_test_expects() -> None:
    assert {t: shards.shard_of(t, N) for t in TENANTS} == TENANTS


@dataclass
class Sharded(Deployment):
    """`Deployment` (``worker``: the batch node on shards 0-1) and the task node on shard 2."""

    task_worker: WorkerProcess | None = None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sharded]:
    tmp = tmp_path_factory.mktemp("aclshards")
    keyring_path = tmp / "keyring.json"
    ring = Keyring().with_new_tenant("acme", ACME_POLICY)
    for tenant in ("initech", "globex"):
        ring = ring.with_new_tenant(tenant)
    save_keyring(keyring_path, ring)
    acl_file, passwords = tmp / "redis" / "users.acl", tmp / "redis" / "passwords"
    acl.generate(ring.tenants, acl_file=acl_file, passwords_dir=passwords, layout=LAYOUT)
    port = free_port()
    operator = (passwords / "operator").read_text().strip()
    proc = _start_server(tmp, port, acl_file, operator)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        MAAS_KEYRING=str(keyring_path),
        MAAS_DIAGNOSTIC_MODELS="1",
        MAAS_SAMPLE_INTERVAL_S="1",
        MAAS_METRICS_PORT="0",
        MAAS_MODEL_DIR=str(tmp / "models"),
        MAAS_QUEUE_SHARDS=str(N),
    )
    server = f"redis://127.0.0.1:{port}/0"
    worker_url = acl.role_url(server, "worker", (passwords / "worker").read_text().strip())
    operator_url = acl.role_url(server, "operator", operator)
    stack = Stack(
        operator_url,
        tmp,
        keyring_path,
        {**env, "MAAS_BROKER_URL": worker_url},
        redis.Redis.from_url(operator_url),
        worker_args=(),
    )
    batch = stack.start_worker("aclsb", concurrency=2, args=("--shards", "0-1"))
    tasks = stack.start_worker("aclst", concurrency=1, args=("--celery-tasks", "--shards", "2"))
    denials(stack.backend)
    try:
        yield Sharded(stack, port, acl_file, passwords, batch, tasks)
    finally:
        for w in (batch, tasks):
            w.stop(timeout_s=5)
        stack.backend.close()
        proc.terminate()
        proc.wait(10)


def ran_by(worker: WorkerProcess) -> set[str]:
    """The job ids whose success ``worker`` logged."""
    return set(re.findall(r"job '([0-9a-f-]+)' succeeded\n", worker.log_path.read_text()))


def no_refusals(d: Sharded, *, probes: bool = True) -> None:
    assert "NOPERM" not in d.stack.worker_logs()
    assert "no permissions" not in d.stack.worker_logs()
    assert set(denials(d.stack.backend)) <= (PROBES if probes else set())


# -- every role does its job -----------------------------------------------------------------
def test_each_producer_submits_on_its_shard_and_both_worker_modes_run_the_jobs(
    deployment: Sharded,
) -> None:
    jobs: dict[str, list[str]] = {}
    for tenant in TENANTS:
        with deployment.client(tenant) as client:
            submitted = client.submit_many("echo", [{"t": tenant, "i": i} for i in range(4)])
            assert [j.result(timeout=WAIT_S) for j in submitted] == [
                {"echo": {"t": tenant, "i": i}} for i in range(4)
            ]
            jobs[tenant] = [j.id for j in submitted]
    assert deployment.task_worker is not None
    # acme (shard 2) ran on the --celery-tasks node, the others on the batch node.
    # (A node logs `succeeded` just after it stores the result: wait for the line.)
    task_worker, worker = deployment.task_worker, deployment.worker
    wait_for(lambda: set(jobs["acme"]) <= ran_by(task_worker), WAIT_S, "acme's jobs logged")
    others = set(jobs["initech"]) | set(jobs["globex"])
    wait_for(lambda: others <= ran_by(worker), WAIT_S, "the other tenants' jobs logged")
    no_refusals(deployment)


def test_the_async_client_and_the_gateway_submit_with_their_roles(deployment: Sharded) -> None:
    from .gatewaykit import Caller, GatewayProcess

    settings = Settings.from_env(deployment.env("producer-globex", MAAS_TENANT="globex"))

    async def scenario() -> list[Any]:
        async with AsyncClient(settings=settings) as client:
            jobs = await client.submit_many("echo", [{"n": i} for i in range(3)])
            return [await done.result() async for done in as_completed(jobs, timeout=WAIT_S)]

    outputs = asyncio.run(scenario())
    assert sorted(o["echo"]["n"] for o in outputs) == [0, 1, 2]

    gw = GatewayProcess(deployment.stack, "aclsgw", MAAS_BROKER_URL=deployment.url("gateway"))
    try:
        for tenant in TENANTS:
            caller = Caller(deployment.stack, gw, tenant)
            header, raw = caller.seal({"t": tenant})
            assert caller.submit(raw).status_code == 202
            done = caller.http.get(f"/v1/jobs/{header.job_id}", params={"wait": WAIT_S}).json()
            assert caller.open(done["result"], header.job_id)["output"] == {"echo": {"t": tenant}}
            caller.http.close()
    finally:
        gw.stop()
    assert "NOPERM" not in gw.service.log()
    no_refusals(deployment)


def test_beat_monitor_and_flower_roles_do_their_jobs_on_every_shard(deployment: Sharded) -> None:
    stack = deployment.stack
    assert deployment.task_worker is not None
    task_node = deployment.task_worker.node
    nodes = [deployment.worker.node, task_node]
    beat = Service(stack, "acls-beat", "beat", "--loglevel", "WARNING", env=deployment.env("beat"))
    port = free_port()
    exporter = Service(
        stack, "acls-metrics", "metrics", "--port", str(port), env=deployment.env("monitor")
    )
    try:
        # The nodes' first shards are 0 and 2: beat's request reached both.
        for node in nodes:
            wait_for(
                lambda node=node: stack.backend.zscore(keyspace.SAMPLES, node),
                WAIT_S,
                f"a resource sample from {node} requested by beat",
            )
        body = wait_for(
            lambda: (r := http_get(f"http://127.0.0.1:{port}/metrics"))[0] == 200 and r[1],
            WAIT_S,
            "the fleet exporter",
        )
        assert "maas_fleet_up 1.0" in body
    finally:
        beat.stop()
        exporter.stop()
    for args in (("stats", "--json"), ("scale", "--json")):
        done = deployment.cli("monitor", *args)
        assert done.returncode == 0, (args, done.stderr)
    stats = json.loads(deployment.cli("monitor", "stats", "--json").stdout)
    assert set(nodes) <= {w["worker"] for w in stats["workers"]}
    assert "Traceback" not in beat.log() + exporter.log()
    no_refusals(deployment, probes=False)

    # Flower follows the first shard of its MAAS_WORKER_SHARDS: 2, the task node's (whose
    # active queues are the job queues: the Broker page counts them on every shard).
    flower = Service(
        stack,
        "acls-flower",
        "flower",
        "--port",
        str(port := free_port()),
        env=deployment.env(
            "flower", MAAS_FLOWER_BASIC_AUTH=":".join(FLOWER_AUTH), MAAS_WORKER_SHARDS="2"
        ),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: (
                (r := http_get(f"{base}/api/workers?refresh=1", auth=FLOWER_AUTH))[0] == 200
                and task_node in r[1]
            ),
            WAIT_S,
            "Flower to list the task node (inspect through shard 2's pidbox)",
        )
        status, body = http_get(f"{base}/api/queues/length", auth=FLOWER_AUTH)
        assert status == 200 and "maas.normal" in body
        with deployment.client("acme") as client:
            job = client.submit("echo", {"flower": 1})
            job.result(timeout=WAIT_S)
        wait_for(
            lambda: http_get(f"{base}/api/task/info/{job.id}", auth=FLOWER_AUTH)[0] == 200,
            WAIT_S,
            "Flower to follow the job from its task events",
        )
    finally:
        flower.stop()
    assert "no permissions" not in flower.log() and "NOPERM" not in flower.log()
    no_refusals(deployment)


# -- and nothing else ---------------------------------------------------------------------------
def _q(shard: int, key: str) -> str:
    return shards.prefix(shard, sharded=True) + key


NORMAL = queue_for("normal")
#: acme is on shard 2: another tenant's list there, and any list of another shard.
FORBIDDEN: dict[str, list[tuple[str, ...]]] = {
    "producer-acme": [
        ("LPUSH", _q(2, fetch.tenant_queue(NORMAL, "globex")), "x"),
        ("LLEN", _q(2, fetch.tenant_queue(NORMAL, "globex"))),
        *(("LPUSH", _q(k, fetch.tenant_queue(NORMAL, "acme")), "x") for k in (0, 1)),
        *(("LLEN", _q(k, fetch.tenant_queue(NORMAL, "acme"))) for k in (0, 1)),
        ("LPUSH", _q(1, fetch.tenant_queue(NORMAL, "globex")), "x"),
        *(("SADD", _q(k, fetch.arrivals_key(NORMAL)), "acme") for k in (0, 1)),
        *(("LPUSH", _q(k, fetch.WAKE_KEY), "1") for k in (0, 1)),
        # The unprefixed keys of an unsharded deployment are no way around it.
        ("LPUSH", fetch.tenant_queue(NORMAL, "acme"), "x"),
        ("SADD", fetch.arrivals_key(NORMAL), "acme"),
        ("LPUSH", fetch.WAKE_KEY, "1"),
        ("RPOP", _q(2, fetch.tenant_queue(NORMAL, "acme"))),
        ("LPUSH", _q(2, NORMAL), "x"),
        ("HSET", _q(2, fetch.UNACKED_KEY), "tag", "[]"),
        ("LPUSH", _q(2, fetch.ring_key(NORMAL)), "acme"),
        ("PUBLISH", _q(2, "/0.celery.pidbox"), "{}"),
        ("PUBLISH", _q(2, "/0.celeryev/task.succeeded"), "{}"),
    ],
    "monitor": [
        *(("LPUSH", _q(k, NORMAL), "x") for k in range(N)),
        ("RPOP", _q(0, fetch.tenant_queue(NORMAL, "initech"))),
        ("SADD", _q(1, fetch.arrivals_key(NORMAL)), "globex"),
        ("PUBLISH", _q(0, "/0.celery.pidbox"), "x"),
    ],
    "beat": [
        ("LPUSH", _q(0, NORMAL), "x"),
        ("PUBLISH", _q(0, "/0.celery.pidbox"), "{}"),
        ("PUBLISH", _q(1, "/0.celeryev/task.sent"), "{}"),
        ("PUBLISH", "/0.maas.monitor/maas.monitor", "{}"),
    ],
    "flower": [
        ("RPOP", _q(0, NORMAL)),
        ("LRANGE", _q(1, fetch.tenant_queue(NORMAL, "globex")), "0", "-1"),
        ("PUBLISH", _q(0, "/0.celeryev/task.sent"), "{}"),
        ("HSET", _q(2, fetch.UNACKED_KEY), "t", "x"),
    ],
    "worker": [
        ("SET", _q(N, "maas.normal"), "x"),  # no shard N
        ("GET", "someone-else:key"),
        ("PUBLISH", "someone-else", "x"),
        ("FLUSHALL",),
    ],
}


@pytest.mark.parametrize("role", sorted(FORBIDDEN))
def test_every_role_is_refused_what_it_does_not_need_on_any_shard(
    deployment: Sharded, role: str
) -> None:
    conn = deployment.redis(role)
    allowed = []
    try:
        for command in FORBIDDEN[role]:
            try:
                conn.execute_command(*command)
            except redis.exceptions.NoPermissionError:
                continue
            allowed.append(command[:2])
    finally:
        conn.close()
    assert allowed == [], f"{role} may run: {allowed}"


def test_a_producer_may_push_only_to_its_own_lists_on_its_own_shard(deployment: Sharded) -> None:
    """What the refusals above leave: its own list of its own shard, length and push."""
    denials(deployment.stack.backend)  # the refusals tried before
    conn = deployment.redis("producer-acme")
    own = _q(2, fetch.tenant_queue(queue_for("low"), "acme"))
    try:
        assert conn.llen(own) == 0
        # Its shard's wake-up list (what every push rings), but no message.
        pipe = conn.pipeline()
        fetch.ring(pipe, 1, shards.prefix(2, sharded=True))
        pipe.execute()
    finally:
        conn.close()
    assert denials(deployment.stack.backend) == []


# -- the same roles on a Redis Cluster ------------------------------------------------------------
#: The group's own user on the nodes (CLUSTER MEET, ADDSLOTSRANGE: admin commands no role
#: has), added to the generated file as an operator adds replication's (scaling.md).
CLUSTER_ADMIN = ("clusteradmin", "cluster-admin-test-password-0123456789")


@pytest.fixture(scope="module")
def on_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sharded]:
    """3 primaries (no replicas: no replication user to add) each started with the ACL
    file for a cluster of 3 shards; a batch node on shards 0-1, a task node on 2."""
    from maas_worker.backend.redis import backend_client
    from maas_worker.local.embedded import ClusterGroup

    tmp = tmp_path_factory.mktemp("aclcluster")
    keyring_path = tmp / "keyring.json"
    ring = Keyring()
    for tenant in TENANTS:
        ring = ring.with_new_tenant(tenant)
    save_keyring(keyring_path, ring)
    acl_file, passwords = tmp / "redis" / "users.acl", tmp / "redis" / "passwords"
    layout = acl.ShardLayout(N, sharded=True, cluster=True)
    acl.generate(ring.tenants, acl_file=acl_file, passwords_dir=passwords, layout=layout)
    with acl_file.open("a") as f:
        f.write(f"user {CLUSTER_ADMIN[0]} on >{CLUSTER_ADMIN[1]} ~* &* +@all\n")
    group = ClusterGroup(
        primaries=3, replicas=0, extra_args=("--aclfile", str(acl_file)), probe_auth=CLUSTER_ADMIN
    ).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        MAAS_KEYRING=str(keyring_path),
        MAAS_DIAGNOSTIC_MODELS="1",
        MAAS_SAMPLE_INTERVAL_S="1",
        MAAS_METRICS_PORT="0",
        MAAS_MODEL_DIR=str(tmp / "models"),
        MAAS_QUEUE_SHARDS=str(N),
        MAAS_REDIS_CLUSTER="1",
        MAAS_REDIS_CLUSTER_NODES=group.seeds,
    )
    server = group.url
    operator_url = acl.role_url(server, "operator", (passwords / "operator").read_text().strip())
    worker_url = acl.role_url(server, "worker", (passwords / "worker").read_text().strip())
    backend = backend_client(Settings.from_env({**env, "MAAS_BROKER_URL": operator_url}))
    stack = Stack(operator_url, tmp, keyring_path, {**env, "MAAS_BROKER_URL": worker_url}, backend)
    try:
        batch = stack.start_worker("aclcb", concurrency=2, args=("--shards", "0-1"))
        tasks = stack.start_worker("aclct", concurrency=1, args=("--celery-tasks", "--shards", "2"))
        yield Sharded(stack, group.nodes[0].port, acl_file, passwords, batch, tasks)
    finally:
        for w in stack.workers:
            w.stop(timeout_s=5)
        backend.close()
        group.stop()


def cluster_denials(d: Sharded) -> set[tuple[str, str, str]]:
    """The refusals every node logged since the last call."""
    found: set[tuple[str, str, str]] = set()
    for port in (
        int(p.rpartition(":")[2]) for p in d.stack.env["MAAS_REDIS_CLUSTER_NODES"].split(",")
    ):
        with redis.Redis(port=port, username=CLUSTER_ADMIN[0], password=CLUSTER_ADMIN[1]) as node:
            found |= set(denials(node))
    return found


def test_every_role_does_its_job_on_a_cluster_and_a_producer_stays_on_its_shard(
    on_cluster: Sharded,
) -> None:
    from .gatewaykit import Caller, GatewayProcess

    d = on_cluster
    assert d.task_worker is not None
    cluster_denials(d)
    for tenant in TENANTS:
        with d.client(tenant) as client:
            jobs = client.submit_many("echo", [{"t": tenant, "i": i} for i in range(3)])
            assert [j.result(timeout=WAIT_S) for j in jobs] == [
                {"echo": {"t": tenant, "i": i}} for i in range(3)
            ]
    gw = GatewayProcess(d.stack, "aclcgw", MAAS_BROKER_URL=d.url("gateway"))
    try:
        caller = Caller(d.stack, gw, "globex")
        header, raw = caller.seal({"t": "gw"})
        assert caller.submit(raw).status_code == 202
        done = caller.http.get(f"/v1/jobs/{header.job_id}", params={"wait": WAIT_S}).json()
        assert caller.open(done["result"], header.job_id)["output"] == {"echo": {"t": "gw"}}
        caller.http.close()
    finally:
        gw.stop()
    assert "NOPERM" not in gw.service.log()
    beat = Service(d.stack, "aclc-beat", "beat", "--loglevel", "WARNING", env=d.env("beat"))
    try:
        for node in (d.worker.node, d.task_worker.node):
            wait_for(
                lambda node=node: d.stack.backend.zscore(keyspace.SAMPLES, node),
                WAIT_S,
                f"a resource sample from {node} requested by beat",
            )
    finally:
        beat.stop()
    stats = d.cli("monitor", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert {d.worker.node, d.task_worker.node} <= {
        w["worker"] for w in json.loads(stats.stdout)["workers"]
    }
    assert "NOPERM" not in d.stack.worker_logs() + beat.log()
    assert cluster_denials(d) <= PROBES

    # WAIT on a cluster (backend/barrier.py): a producer and the gateway may write their
    # tenant's barrier key and WAIT (a MOVED reply: the ACL let it through, the slot
    # is another node's).
    for user, tenant in (("producer-acme", "acme"), ("gateway", "globex")):
        conn = d.redis(user)
        try:
            with contextlib.suppress(redis.exceptions.MovedError):
                conn.execute_command("SET", keyspace.barrier(tenant), "1", "PX", 10_000)
            assert conn.execute_command("WAIT", 0, 0) == 0
        finally:
            conn.close()

    # On any node (the ACL is checked before the slot): no list of another shard.
    conn = d.redis("producer-acme")
    allowed = []
    try:
        for command in FORBIDDEN["producer-acme"]:
            try:
                conn.execute_command(*command)
            except redis.exceptions.NoPermissionError:
                continue
            allowed.append(command[:2])
    finally:
        conn.close()
    assert allowed == []
