"""Least-privilege Redis roles (`maas_worker.tenancy.acl`) against a real server with ACLs.

One server per module, started with the ``users.acl`` that ``maas-worker
acl`` writes (the embedded Valkey; the TLS tests load the same rules into
Redis 7.0), one worker with the worker role, and every other process with
its own role: a producer-acme client, beat, the fleet exporter and
``stats`` (monitor), Flower (flower), ``audit`` and ``celery inspect``
(operator). Then what each role must NOT do is tried, each refused with
``NOPERM``, and the attack the roles exist for: a producer that deletes a
finished job's state and pushes a copy of its message again does not get
the job run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from maas_worker import AsyncClient, Client, as_completed
from maas_worker.backend import catalog, functions, keyspace
from maas_worker.backend.audit import AuditLog
from maas_worker.broker import fetch
from maas_worker.client.wire import MessageBuilder
from maas_worker.errors import ConfigError, JobCancelled
from maas_worker.local.embedded import free_port, server_binary
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings
from maas_worker.tenancy import acl
from maas_worker.tenancy.keyring import Keyring, TenantPolicy, load_keyring, save_keyring

from .conftest import Stack, wait_for
from .services import Service, http_get

pytestmark = pytest.mark.integration
WAIT_S = 60.0
FLOWER_AUTH = ("ops", "flower-test-credentials")
#: acme has a quota, so its clients run the advisory check (a library function).
ACME_POLICY = TenantPolicy(rate_per_s=1000.0, burst=1000, max_in_flight=100)


@dataclass
class Deployment:
    """The server with the generated ACL, the files, and one running worker."""

    stack: Stack  # env = the worker's; backend = the operator's client
    port: int
    acl_file: Path
    passwords: Path
    worker: WorkerProcess

    def url(self, role: str) -> str:
        return acl.role_url(
            f"redis://127.0.0.1:{self.port}/0", role, (self.passwords / role).read_text().strip()
        )

    def env(self, role: str, **extra: str) -> dict[str, str]:
        return {**self.stack.env, "MAAS_BROKER_URL": self.url(role), **extra}

    def redis(self, role: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(role))

    def client(self, tenant: str = "acme") -> Client:
        return Client(
            settings=Settings.from_env(self.env(f"producer-{tenant}", MAAS_TENANT=tenant))
        )

    def cli(self, role: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "maas_worker", *args],
            env=self.env(role, **env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def denials(operator: redis.Redis) -> list[tuple[str, str, str]]:
    """(user, reason, object) of each refusal the server logged since the last call."""
    rows: Any = operator.execute_command("ACL", "LOG", 128)
    operator.execute_command("ACL", "LOG", "RESET")
    out = []
    for row in rows:
        entry = row if isinstance(row, dict) else dict(zip(row[::2], row[1::2], strict=True))
        text = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in entry.items()
        }
        out.append((text["username"], text["reason"], text["object"]))
    return out


#: The one refusal a producer meets by design: the client asks once whether it may
#: publish (its task-sent event) by trying, and goes without the event.
PROBE = ("producer-acme", "command", "publish")


def _start_server(
    d: Path,
    port: int,
    acl_file: Path,
    operator: str,
    *,
    appendonly: bool = False,
    binary: str | None = None,
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            binary or str(server_binary()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--dir",
            str(d),
            "--logfile",
            str(d / "server.log"),
            "--aclfile",
            str(acl_file),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = redis.Redis(port=port, username="operator", password=operator, socket_connect_timeout=1)
    try:

        def up() -> bool:
            assert proc.poll() is None, (d / "server.log").read_text()[-500:]
            with contextlib.suppress(redis.ConnectionError):
                return bool(probe.ping())
            return False

        wait_for(up, 10, "the server with the ACL file")
    finally:
        probe.close()
    return proc


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("acl")
    keyring_path = tmp / "keyring.json"
    ring = Keyring().with_new_tenant("acme", ACME_POLICY).with_new_tenant("globex")
    save_keyring(keyring_path, ring)
    acl_file, passwords = tmp / "redis" / "users.acl", tmp / "redis" / "passwords"
    acl.generate(ring.tenants, acl_file=acl_file, passwords_dir=passwords)
    port = free_port()
    proc = _start_server(tmp, port, acl_file, (passwords / "operator").read_text().strip())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        MAAS_KEYRING=str(keyring_path),
        MAAS_DIAGNOSTIC_MODELS="1",
        MAAS_SAMPLE_INTERVAL_S="1",
        MAAS_METRICS_PORT="0",
        MAAS_MODEL_DIR=str(tmp / "models"),
    )
    operator_url = acl.role_url(
        f"redis://127.0.0.1:{port}/0", "operator", (passwords / "operator").read_text().strip()
    )
    worker_url = acl.role_url(
        f"redis://127.0.0.1:{port}/0", "worker", (passwords / "worker").read_text().strip()
    )
    stack = Stack(
        operator_url,
        tmp,
        keyring_path,
        {**env, "MAAS_BROKER_URL": worker_url},
        redis.Redis.from_url(operator_url),
        worker_args=(),
    )
    # --autoscale: the autoscaler reads the backlog (a read-only library function).
    worker = stack.start_worker("aclw", concurrency=2, args=("--autoscale", "2,1"))
    denials(stack.backend)
    try:
        yield Deployment(stack, port, acl_file, passwords, worker)
    finally:
        worker.stop(timeout_s=5)
        stack.backend.close()
        proc.terminate()
        proc.wait(10)


# -- every role does its job -----------------------------------------------------------------
def test_a_producer_submits_waits_and_cancels_with_its_role(deployment: Deployment) -> None:
    with deployment.client() as client:
        jobs = client.submit_many("echo", [{"n": i} for i in range(3)], priority="high")
        big = client.submit("echo", {"text": "x" * 60_000})  # claim check: a payload key
        # It read the live node list (and the catalogue, live and durable) with its role.
        assert all(j.worker_live for j in jobs)
        assert [j.result(timeout=WAIT_S) for j in jobs] == [{"echo": {"n": i}} for i in range(3)]
        assert big.result(timeout=WAIT_S) == {"echo": {"text": "x" * 60_000}}
        slow = client.submit("sleep", {"seconds": 30})
        wait_for(lambda: slow.status() == "running", WAIT_S, "the slow job to start")
        assert slow.cancel()
        with pytest.raises(JobCancelled):
            slow.result(timeout=WAIT_S)
    done = deployment.cli("producer-acme", "status", "--json", jobs[0].id, MAAS_TENANT="acme")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "succeeded"
    assert "NOPERM" not in deployment.stack.worker_logs()
    # The worker's advertiser recorded what it serves in the durable catalogue.
    assert {"echo@1", "sleep@1"} <= catalog.known(deployment.stack.backend)
    # Nothing the producer or the worker did was refused, but the probe.
    assert set(denials(deployment.stack.backend)) <= {PROBE}


def test_a_producer_registers_its_ckks_context_with_its_role(deployment: Deployment) -> None:
    """What `Client.submit_private` does before its jobs: read the TTL of its public CKKS
    context's key and (re)write it (docs/private-inference.md)."""
    key = keyspace.ckks_context("acme", "ab" * 32)
    conn = deployment.redis("producer-acme")
    try:
        assert conn.ttl(key) == -2
        assert conn.set(key, b"public context", ex=600)
        assert 0 < conn.ttl(key) <= 600
    finally:
        conn.close()
    assert deployment.stack.backend.get(key) == b"public context"


def test_the_gateway_serves_every_tenant_with_its_role(deployment: Deployment) -> None:
    from .gatewaykit import Caller, GatewayProcess

    gw = GatewayProcess(deployment.stack, "aclgw", MAAS_BROKER_URL=deployment.url("gateway"))
    try:
        for tenant in ("acme", "globex"):  # acme has a quota: the advisory check runs
            caller = Caller(deployment.stack, gw, tenant)
            header, raw = caller.seal({"t": tenant})
            assert caller.submit(raw).status_code == 202
            assert caller.submit(raw).json()["duplicate"] is True
            done = caller.http.get(f"/v1/jobs/{header.job_id}", params={"wait": WAIT_S}).json()
            assert caller.open(done["result"], header.job_id)["output"] == {"echo": {"t": tenant}}
            forged_header, forged = caller.seal({"t": "forged"})
            forged = forged[:-1] + bytes([forged[-1] ^ 1])
            assert caller.submit(forged).status_code == 401
            deployment.stack.wait_audit(forged_header.job_id, "tampered")
            caller.http.close()
        acme = Caller(deployment.stack, gw, "acme")
        slow_header, slow = acme.seal({"seconds": 30}, model="sleep")
        assert acme.submit(slow).status_code == 202
        assert acme.http.delete(f"/v1/jobs/{slow_header.job_id}").status_code == 200
        ended = acme.http.get(f"/v1/jobs/{slow_header.job_id}", params={"wait": WAIT_S}).json()
        assert ended["state"] in ("cancelled", "completed")
        acme.http.close()
    finally:
        gw.stop()
    assert "NOPERM" not in gw.service.log()
    assert set(denials(deployment.stack.backend)) <= {PROBE}


def test_the_async_client_submits_waits_and_cancels_with_the_producer_role(
    deployment: Deployment,
) -> None:
    settings = Settings.from_env(deployment.env("producer-acme", MAAS_TENANT="acme"))

    async def scenario() -> tuple[list[dict[str, Any]], bool, str]:
        async with AsyncClient(settings=settings) as client:
            jobs = await client.submit_many("echo", [{"n": i} for i in range(5)])
            # Its waiter reads a batch of jobs with one MGET and blocks on the done lists.
            outputs = [await done.result() async for done in as_completed(jobs, timeout=WAIT_S)]
            slow = await client.submit("sleep", {"seconds": 30})
            deadline = time.monotonic() + WAIT_S
            while await slow.status() != "running" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            cancelled = await slow.cancel()
            return outputs, cancelled, str(await slow.status())

    outputs, cancelled, state = asyncio.run(scenario())
    assert sorted(o["echo"]["n"] for o in outputs) == list(range(5))
    assert cancelled and state == "cancelled"
    assert "NOPERM" not in deployment.stack.worker_logs()
    assert set(denials(deployment.stack.backend)) <= {PROBE}


def test_a_batch_consumer_worker_runs_jobs_with_the_worker_role(deployment: Deployment) -> None:
    batch = deployment.stack.start_worker("aclb", concurrency=1, args=("--batch-consumer",))
    try:
        with deployment.client() as client:
            jobs = client.submit_many("echo", [{"b": i} for i in range(8)], priority="low")
            assert [j.result(timeout=WAIT_S) for j in jobs] == [
                {"echo": {"b": i}} for i in range(8)
            ]
    finally:
        batch.stop(timeout_s=10)
    assert "no permissions" not in batch.log_path.read_text()
    assert set(denials(deployment.stack.backend)) <= {PROBE}


def test_beat_monitor_and_operator_roles_do_their_jobs(deployment: Deployment) -> None:
    stack = deployment.stack
    beat = Service(stack, "acl-beat", "beat", "--loglevel", "WARNING", env=deployment.env("beat"))
    port = free_port()
    exporter = Service(
        stack, "acl-metrics", "metrics", "--port", str(port), env=deployment.env("monitor")
    )
    try:
        wait_for(
            lambda: stack.backend.zscore(keyspace.SAMPLES, deployment.worker.node),
            WAIT_S,
            "a resource sample requested by beat",
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
    for role, args in (
        ("monitor", ("stats", "--json")),
        ("monitor", ("scale", "--json")),
        ("operator", ("stats", "--json")),
        ("operator", ("audit", "--json")),
        ("operator", ("ping", "--node", deployment.worker.node)),
    ):
        done = deployment.cli(role, *args)
        assert done.returncode == 0, (role, args, done.stderr)
    stats = json.loads(deployment.cli("monitor", "stats", "--json").stdout)
    assert deployment.worker.node in {w["worker"] for w in stats["workers"]}
    assert "Traceback" not in beat.log() + exporter.log()
    assert denials(deployment.stack.backend) == []


def test_flower_serves_with_its_role_and_the_operator_inspects(deployment: Deployment) -> None:
    port = free_port()
    flower = Service(
        deployment.stack,
        "acl-flower",
        "flower",
        "--port",
        str(port),
        env=deployment.env("flower", MAAS_FLOWER_BASIC_AUTH=":".join(FLOWER_AUTH)),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        workers = wait_for(
            lambda: (
                (r := http_get(f"{base}/api/workers?refresh=1", auth=FLOWER_AUTH))[0] == 200
                and deployment.worker.node in r[1]
                and r[1]
            ),
            WAIT_S,
            "Flower to list the worker (inspect through the pidbox)",
        )
        assert "stats" in json.loads(workers)[deployment.worker.node]
        status, body = http_get(f"{base}/api/queues/length", auth=FLOWER_AUTH)
        assert status == 200 and "maas.high" in body
        with deployment.client() as client:
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
    assert set(denials(deployment.stack.backend)) <= {PROBE}
    inspect = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "maas_worker.app",
            "inspect",
            "ping",
            "-t",
            "5",
            "-d",
            deployment.worker.node,
        ],
        env=deployment.env("operator"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert inspect.returncode == 0 and "pong" in inspect.stdout, inspect.stderr


# -- and nothing else ---------------------------------------------------------------------------
JOB = "0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c"
ACME, GLOBEX = keyspace.tenant_prefix("acme"), keyspace.tenant_prefix("globex")
FORBIDDEN: dict[str, list[tuple[str, ...]]] = {
    # The HTTP gateway: every tenant's producer, and its own records; no more.
    "gateway": [
        *(("DEL", f"{ACME}{kind}:{JOB}") for kind in ("result", "claim", "rejected", "job")),
        ("SET", f"{ACME}result:{JOB}", "x"),
        ("SET", f"{GLOBEX}claim:{JOB}", "x"),
        ("DEL", "maas.high"),
        ("RPOP", "maas.high"),
        ("XDEL", keyspace.AUDIT_STREAM, "0-1"),
        ("DEL", keyspace.AUDIT_STREAM),
        ("PUBLISH", "/0.celeryev/task.sent", "{}"),
        ("EVAL", "return 1", "0"),
        ("KEYS", "*"),
        ("SET", "someone-else:key", "x"),
        ("FLUSHALL",),
    ],
    "producer-acme": [
        # Another tenant's public CKKS context (private inference), and deleting its own.
        ("SET", f"{GLOBEX}ckks:{'0' * 64}", "x"),
        ("TTL", f"{GLOBEX}ckks:{'0' * 64}"),
        ("DEL", f"{ACME}ckks:{'0' * 64}"),
        *(
            ("DEL", f"{ACME}{kind}:{JOB}")
            for kind in ("claim", "result", "attempts", "faults", "rejected", "suspect", "killed")
        ),
        *(
            ("SET", f"{ACME}{kind}:{JOB}", "done")
            for kind in ("claim", "result", "attempts", "faults", "rejected", "suspect", "killed")
        ),
        ("HSET", f"{ACME}bucket", "tokens", "1000"),
        ("DEL", f"{ACME}bucket"),
        ("ZADD", f"{ACME}inflight", "1", JOB),
        ("ZREM", f"{ACME}inflight", JOB),
        ("DEL", f"{ACME}inflight"),
        ("ZREMRANGEBYSCORE", f"{ACME}inflight", "-inf", "+inf"),
        ("XADD", keyspace.AUDIT_STREAM, "*", "reason", "forged"),
        ("DEL", keyspace.AUDIT_STREAM),
        ("XTRIM", keyspace.AUDIT_STREAM, "MAXLEN", "0"),
        ("GET", f"{GLOBEX}result:{JOB}"),
        ("EXISTS", f"{GLOBEX}job:{JOB}"),
        ("SET", f"{GLOBEX}cancel:{JOB}", "x"),
        ("SET", f"{GLOBEX}job:{JOB}", "1"),
        (
            "FCALL",
            functions.CANCEL,
            "7",
            *(
                f"{GLOBEX}{k}:{JOB}"
                for k in ("result", "cancel", "done", "job", "rejected", "claim")
            ),
            f"{GLOBEX}pending",
            "t",
            "1",
            "1",
            JOB,
            "1",
        ),
        ("DEL", "maas.high"),
        ("LPOP", "maas.high"),
        ("RPOP", "maas.normal"),
        # Fair share: only its own list of each queue, and only its name added to
        # the arrivals; no other tenant's list, the old shared list or the ring.
        ("LPUSH", "maas.high", "x"),
        ("LPUSH", "maas.normal.globex", "x"),
        ("LLEN", "maas.normal.globex"),
        ("RPOP", "maas.normal.acme"),
        ("LRANGE", "maas.normal.acme", "0", "-1"),
        ("SREM", "maas:arrivals:maas.normal", "globex"),
        ("SPOP", "maas:arrivals:maas.normal"),
        ("SMEMBERS", "maas:arrivals:maas.normal"),
        ("LPUSH", "maas:ring:maas.normal", "acme"),
        ("LMOVE", "maas:ring:maas.normal", "maas:ring:maas.normal", "RIGHT", "RIGHT"),
        ("HSET", "maas:ring:maas.normal:credit", "acme", "1000"),
        ("HSET", "maas:weights", "acme", "100"),
        ("LTRIM", "maas.low", "1", "0"),
        ("LRANGE", "maas.high", "0", "-1"),
        ("LINDEX", "maas.high", "0"),
        ("RPUSH", "maas.high", "{}"),
        ("LPUSH", "maas.monitor", "x"),
        ("HSET", "unacked", "tag", "[]"),
        ("HDEL", "unacked", "tag"),
        ("ZADD", "unacked_index", "1", "tag"),
        ("HGETALL", "unacked"),
        ("SADD", "_kombu.binding.maas", "maas.high\x06\x16\x06\x16unacked"),
        ("SREM", "_kombu.binding.maas", "x"),
        ("ZADD", keyspace.NODES, "1", "fake"),
        ("ZADD", keyspace.CATALOG, "1", "fake@1"),
        ("SADD", keyspace.MODELS, "fake@1"),
        ("DEL", keyspace.MODELS),
        ("PUBLISH", "/0.celery.pidbox", "{}"),
        ("PUBLISH", "/0.celeryev/task.succeeded", "{}"),
        ("PUBLISH", "/0.celeryev/task.sent", "{}"),
        ("PUBLISH", "/0.maas.monitor/maas.monitor", "{}"),
        ("EVAL", "return 1", "0"),
        ("EVALSHA", "0" * 40, "0"),
        ("SCRIPT", "LOAD", "return 1"),
        (
            "FUNCTION",
            "LOAD",
            "#!lua name=evil\nredis.register_function('f', function() while true do end end)",
        ),
        ("FUNCTION", "FLUSH"),
        ("FUNCTION", "DELETE", functions.LIBRARY),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("ACL", "LIST"),
        ("CLIENT", "LIST"),
        ("MONITOR",),
        ("SHUTDOWN",),
    ],
    "monitor": [
        ("SET", keyspace.NODES, "x"),
        ("DEL", "maas.high"),
        ("LPUSH", "maas.high", "x"),
        ("RPOP", "maas.high"),
        ("RPOP", "maas.high.acme"),
        ("LPUSH", "maas:ring:maas.high", "acme"),
        ("SADD", "maas:arrivals:maas.high", "acme"),
        ("HSET", "maas:weights", "acme", "100"),
        ("GET", f"{ACME}result:{JOB}"),
        ("XRANGE", keyspace.AUDIT_STREAM, "-", "+"),
        ("PUBLISH", "/0.celery.pidbox", "x"),
        ("EVAL", "return 1", "0"),
        ("FUNCTION", "LOAD", "x"),
        ("KEYS", "*"),
    ],
    "flower": [
        ("LPUSH", "maas.high", "x"),
        ("DEL", "maas.high"),
        ("RPOP", "maas.high"),
        # It counts the tenants' lists (from the ring), never reads their messages.
        ("LRANGE", "maas.normal.acme", "0", "-1"),
        ("LPUSH", "maas:ring:maas.normal", "globex"),
        ("GET", f"{ACME}result:{JOB}"),
        ("PUBLISH", "/0.celeryev/task.sent", "{}"),
        ("PUBLISH", "/0.maas.monitor/maas.monitor", "{}"),
        ("HSET", "unacked", "t", "x"),
        ("EVAL", "return 1", "0"),
        ("FLUSHALL",),
    ],
    "beat": [
        ("GET", f"{ACME}result:{JOB}"),
        ("LPUSH", "maas.high", "x"),
        ("PUBLISH", "/0.celery.pidbox", "{}"),
        ("PUBLISH", "/0.celeryev/task.sent", "{}"),
        ("EVAL", "return 1", "0"),
    ],
    "worker": [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("KEYS", "*"),
        ("CONFIG", "SET", "save", ""),
        ("FUNCTION", "FLUSH"),
        ("SCRIPT", "FLUSH"),
        ("ACL", "LOAD"),
        ("GET", "someone-else:key"),
        ("SET", "someone-else:key", "x"),
        ("PUBLISH", "someone-else", "x"),
        ("SHUTDOWN",),
    ],
    "operator": [
        ("FLUSHALL",),
        ("KEYS", "*"),
        ("CONFIG", "SET", "save", ""),
        ("SHUTDOWN",),
        ("ACL", "SETUSER", "evil", "on", "nopass", "+@all", "~*"),
    ],
}


@pytest.mark.parametrize("role", sorted(FORBIDDEN))
def test_every_role_is_refused_what_it_does_not_need(deployment: Deployment, role: str) -> None:
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


def test_the_default_user_is_off(deployment: Deployment) -> None:
    conn = redis.Redis(port=deployment.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        conn.ping()
    conn.close()


def _servers() -> list[Any]:
    """The embedded Valkey, and the system's redis-server where there is one (CI installs
    Debian's, 7.0): servers before the fix of valkey-io/valkey#3983 lose the jobs."""
    system = shutil.which("redis-server")
    skip = pytest.mark.skipif(system is None, reason="no redis-server on PATH")
    return [pytest.param(None, id="embedded"), pytest.param(system, id="system", marks=skip)]


@pytest.mark.parametrize("binary", _servers())
def test_a_queued_job_survives_a_restart_with_the_generated_acl(
    tmp_path: Path, binary: str | None
) -> None:
    """The append-only file is replayed as `default`, whose rules older servers check
    every transaction in it against: a `default` with no permissions drops each one
    (a submit is a MULTI/EXEC) and the queued job is gone after a restart."""
    keyring_path = tmp_path / "keyring.json"
    save_keyring(keyring_path, Keyring().with_new_tenant("acme"))
    acl_file, passwords = tmp_path / "redis" / "users.acl", tmp_path / "redis" / "passwords"
    acl.generate(["acme"], acl_file=acl_file, passwords_dir=passwords)
    operator_password = (passwords / "operator").read_text().strip()
    producer_password = (passwords / "producer-acme").read_text().strip()
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {
        "MAAS_KEYRING": str(keyring_path),
        "MAAS_TENANT": "acme",
        "MAAS_BROKER_URL": acl.role_url(url, "producer-acme", producer_password),
    }
    start = {"appendonly": True, "binary": binary}
    proc = _start_server(tmp_path, port, acl_file, operator_password, **start)
    try:
        with Client(settings=Settings.from_env(env)) as client:
            # No worker has run here: the bundled model is what a client may ask for.
            job = client.submit("digits", {"inputs": [[0] * 64]}, priority="high")
            assert job.status() == "queued"
        # What workers' library functions write reaches the file as MULTI/EXEC
        # (a claim, a result): one transaction of the operator's stands for them
        # (two writes: a server writes a transaction of one without MULTI/EXEC).
        operator = redis.Redis.from_url(acl.role_url(url, "operator", operator_password))
        try:
            tx = operator.pipeline(transaction=True)
            tx.set("maas:aof-check", "1").set("maas:aof-check:2", "2").execute()
        finally:
            operator.close()
        proc.terminate()  # a clean shutdown: the append-only file is flushed
        proc.wait(10)
        proc = _start_server(tmp_path, port, acl_file, operator_password, **start)
        operator = redis.Redis.from_url(acl.role_url(url, "operator", operator_password))
        try:
            log = (tmp_path / "server.log").read_text()[-800:]
            # The job is in acme's list of the queue, and acme still among its arrivals.
            assert operator.llen("maas.high.acme") == 1, log
            assert operator.smembers("maas:arrivals:maas.high") == {b"acme"}, log
            assert operator.mget("maas:aof-check", "maas:aof-check:2") == [b"1", b"2"], log
        finally:
            operator.close()
        with Client(settings=Settings.from_env(env)) as client:
            assert client.job(job.id).status() == "queued"
    finally:
        proc.terminate()
        proc.wait(10)


def test_replaying_a_finished_job_after_trying_to_delete_its_state_fails(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack of issue #13 with producer-acme's credentials: keep a copy of the
    message, let the job finish, delete its claim, result and attempts (refused),
    push the copy again: the worker refuses it as replayed; the result stays."""
    sent: list[tuple[str, str]] = []
    build = MessageBuilder.messages

    def wiretap(self: Any, tenant: str, sealed: Any, queue: str) -> list[str]:
        entries = build(self, tenant, sealed, queue)
        # What this producer itself sent, to its tenant's list of the queue (fetch.push).
        sent.extend((fetch.tenant_queue(queue, tenant), e) for e in entries)
        return entries

    monkeypatch.setattr(MessageBuilder, "messages", wiretap)
    with deployment.client() as client:
        job = client.submit("echo", {"once": True}, priority="high")
        assert job.result(timeout=WAIT_S) == {"echo": {"once": True}}
    ((queue, copy),) = sent
    operator = deployment.stack.backend
    result = operator.get(keyspace.result("acme", job.id))
    producer = deployment.redis("producer-acme")
    try:
        for kind in ("claim", "result", "attempts"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                producer.delete(f"{ACME}{kind}:{job.id}")
        producer.lpush(queue, copy)
        producer.sadd(fetch.arrivals_key("maas.high"), "acme")  # as the client does
        producer.lpush("maas:wake", "1")
    finally:
        producer.close()
    wait_for(
        lambda: any(
            r.job_id == job.id and r.reason == "replayed"
            for r in AuditLog(operator, maxlen=10_000).latest(1000)
        ),
        WAIT_S,
        "the replay to be refused",
    )
    assert operator.get(keyspace.result("acme", job.id)) == result
    # One run, one refusal: the model did not run again.
    assert deployment.stack.outcomes(job.id, at_least=2) == ["succeeded", "replayed"]
    time.sleep(0.5)
    assert deployment.stack.outcomes(job.id, at_least=2) == ["succeeded", "replayed"]


# -- the function library and the generator against the server ---------------------------------
def test_a_producer_without_the_library_says_how_to_load_it(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A library version this server lacks (a worker here would load the real
    # one again at once: its autoscaler reads the backlog with it).
    monkeypatch.setattr(functions, "CANCEL", "maas_v0_cancel")
    with (
        deployment.client() as client,
        pytest.raises(
            ConfigError,
            match=r"may not load it: run `maas-worker acl "
            r"--load-functions` as the operator",
        ),
    ):
        client.job(JOB).cancel()
    monkeypatch.undo()
    operator = deployment.stack.backend
    operator.function_delete(functions.LIBRARY)
    loaded = deployment.cli("operator", "acl", "--load-functions")
    assert loaded.returncode == 0, loaded.stderr
    assert operator.function_list(library=functions.LIBRARY)
    with deployment.client() as client, pytest.raises(Exception, match="no job of tenant 'acme'"):
        client.job(JOB).cancel()


def test_a_producer_without_the_new_library_writes_its_markers_one_by_one(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A rolling upgrade: the server has an older library only, and a producer may not
    # load the new one. The jobs are queued by the time the markers are written: the
    # markers must not fail for want of a function, so they go per job, as before.
    monkeypatch.setattr(functions, "MARK_QUEUED", "maas_v0_mark_queued")
    with (
        caplog.at_level(logging.WARNING, logger="maas_worker.backend.functions"),
        deployment.client() as client,
    ):
        jobs = client.submit_many("echo", [{"n": i} for i in range(3)])
        results = [j.result(timeout=WAIT_S) for j in jobs]
    assert results == [{"echo": {"n": i}} for i in range(3)]
    assert "maas_v0_mark_queued is not loaded" in caplog.text
    for job in jobs:
        assert deployment.stack.backend.exists(keyspace.submitted("acme", job.id))


def test_a_new_tenant_gets_its_user_by_rerunning_acl_with_apply(deployment: Deployment) -> None:
    before = {p.name: p.read_text() for p in deployment.passwords.iterdir()}
    ring = load_keyring(deployment.stack.keyring_path).with_new_tenant("initech")
    save_keyring(deployment.stack.keyring_path, ring)
    done = deployment.cli(
        "operator",
        "acl",
        "--acl-file",
        str(deployment.acl_file),
        "--passwords",
        str(deployment.passwords),
        "--apply",
    )
    assert done.returncode == 0, done.stderr
    after = {p.name: p.read_text() for p in deployment.passwords.iterdir()}
    assert set(after) - set(before) == {"producer-initech"}
    assert all(after[name] == text for name, text in before.items())
    for line in done.stdout.splitlines():  # no password printed without --urls
        assert ":****@" in line
    assert not any(text.strip() in done.stdout + done.stderr for text in after.values())
    with deployment.client("initech") as client:
        job = client.submit("echo", {"new": "tenant"})
        assert job.result(timeout=WAIT_S) == {"echo": {"new": "tenant"}}
