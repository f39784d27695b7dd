"""Integration fixtures: a real Redis server and real worker processes.

Each `Stack` is a private Redis-compatible server (the embedded Valkey, on a
free port) with its own keyring and workers, torn down after the test. With
``MAAS_TEST_REDIS_URL`` set, stacks use that server instead, one database
each, flushed before use (it is the URL we were given).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from maas_worker import AsyncClient, Client
from maas_worker.backend.audit import AuditLog, AuditRecord
from maas_worker.broker import fetch
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.protocol import queue_for
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import Keyring, TenantPolicy, save_keyring

from .aioshim import BlockingAsyncClient

WAIT_S = 60.0
_db_counter = iter(range(1, 16))


@dataclass
class Stack:
    """One isolated deployment: Redis, keyring, environment, workers."""

    url: str
    tmp: Path
    keyring_path: Path
    env: dict[str, str]
    backend: redis.Redis
    workers: list[WorkerProcess] = field(default_factory=list)
    #: Flags every worker of this stack starts with (``--celery-tasks``; without
    #: any, a worker runs the batch consumer, the default mode).
    worker_args: tuple[str, ...] = ()
    #: The stack's gateway process (gatewaykit.GatewayProcess), once a
    #: ``kind="gateway"`` client asked for it: one per stack, stopped with it.
    gateway: Any = None

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def client(self, tenant: str = "acme", *, kind: str = "sync", **kw: Any) -> Any:
        """A `Client`; with ``kind="async"`` an `AsyncClient` behind the same sync
        interface (aioshim.py), with ``kind="gateway"`` a `Client(gateway_url=...)`
        through this stack's gateway (started at the first such client), so a test
        taking `client_kind` checks all three."""
        if kind == "async":
            return BlockingAsyncClient(self.async_client(tenant, **kw))
        settings = Settings.from_env({**self.env, "MAAS_TENANT": tenant})
        if kind == "gateway":
            return Client(settings=settings, gateway_url=self.gateway_url(), **kw)
        return Client(settings=settings, **kw)

    def gateway_url(self) -> str:
        """The URL of this stack's ``maas-worker gateway``, started on first use."""
        if self.gateway is None:
            from .gatewaykit import GatewayProcess  # it imports this module

            self.gateway = GatewayProcess(self, "client-kind-gateway")
        url: str = self.gateway.url
        return url

    def stop_gateway(self) -> None:
        """Stop the gateway `gateway_url` started, if any."""
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None

    def async_client(self, tenant: str = "acme", **kw: Any) -> AsyncClient:
        """`client` for asyncio code (the same settings)."""
        return AsyncClient(settings=Settings.from_env({**self.env, "MAAS_TENANT": tenant}), **kw)

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``maas-worker ARGS`` as a user runs it, with this stack's environment."""
        return subprocess.run(
            [sys.executable, "-m", "maas_worker", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_worker(
        self,
        name: str | None = None,
        *,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> WorkerProcess:
        name = name or f"w{len(self.workers) + 1}"
        w = WorkerProcess(
            env={**self.env, **(env or {})},
            name=name,
            log_path=self.tmp / f"{name}.log",
            concurrency=concurrency,
            extra_args=(*self.worker_args, *args),
        )
        self.workers.append(w)
        w.start()
        w.wait_ready(self.backend)
        return w

    def worker_logs(self) -> str:
        return "\n".join(
            w.log_path.read_text(errors="replace") for w in self.workers if w.log_path.exists()
        )

    def outcomes(self, job_id: str, at_least: int = 1) -> list[str]:
        """The outcome lines the workers logged for ``job_id``, in order.

        A worker logs the outcome just after storing the result, so a client
        can hold the result a moment before the line is written: wait for it.
        """
        pattern = re.compile(rf"job '{re.escape(job_id)}' (\w+)(?:: \w+)?\n")

        def lines() -> list[str]:
            found = pattern.findall(self.worker_logs())
            return found if len(found) >= at_least else []

        result: list[str] = wait_for(lines, WAIT_S, f"{at_least} outcome line(s) for {job_id}")
        return result

    def finished_order(self, job_ids: list[str]) -> list[str]:
        """Job ids in the order workers finished them, once all of ``job_ids`` have."""
        pattern = re.compile(r"job '([0-9a-f-]+)' (?:succeeded|failed(?:: \w+)?)\n")

        def order() -> list[str]:
            found = pattern.findall(self.worker_logs())
            return found if set(job_ids) <= set(found) else []

        result: list[str] = wait_for(order, WAIT_S, "the jobs' outcome lines")
        return result

    def audit(self) -> list[AuditRecord]:
        return AuditLog(self.backend, maxlen=10_000).latest(10_000)

    def wait_audit(self, job_id: str, reason: str, timeout: float = WAIT_S) -> AuditRecord:
        """Wait until an audit record for ``job_id`` with ``reason`` exists."""

        def found() -> AuditRecord | None:
            return next(
                (r for r in self.audit() if r.job_id == job_id and r.reason == reason), None
            )

        return wait_for(found, timeout, f"audit {reason} for {job_id}")

    def tenant_queue(self, priority: str, tenant: str = "acme") -> str:
        """The list a client of ``tenant`` pushes its ``priority`` jobs to (fair share)."""
        return fetch.tenant_queue(queue_for(priority), tenant)

    def job_lists(self, priority: str) -> list[str]:
        """Every list holding ``priority`` jobs: the queue's own, then each tenant's."""
        queue = queue_for(priority)
        tenants = sorted(k.decode() for k in self.backend.keys(f"{queue}.*"))
        return [queue, *(k for k in tenants if fetch.split_tenant_queue(k))]

    def queued_messages(self, queue: str) -> list[bytes]:
        return list(self.backend.lrange(queue, 0, -1))

    def rotate_keyring(self, ring: Keyring) -> None:
        save_keyring(self.keyring_path, ring)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def make_keyring() -> Keyring:
    ring = Keyring().with_new_tenant("acme")
    return ring.with_new_tenant("globex", TenantPolicy(("echo",), "normal"))


def _redis_url() -> tuple[str, EmbeddedRedis | None]:
    given = os.environ.get("MAAS_TEST_REDIS_URL")
    if given:
        base = redis.Redis.from_url(given)
        db = next(_db_counter)
        url = given.rsplit("/", 1)[0] + f"/{db}" if given.count("/") >= 3 else f"{given}/{db}"
        redis.Redis.from_url(url).flushdb()
        base.close()
        return url, None
    server = EmbeddedRedis().start()
    return server.url, server


@pytest.fixture
def make_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack(**env)`` gives a fresh, isolated `Stack`."""
    made: list[tuple[Stack, EmbeddedRedis | None]] = []

    def factory(**extra_env: str) -> Stack:
        tmp = tmp_path_factory.mktemp("stack")
        url, server = _redis_url()
        keyring_path = tmp / "keyring.json"
        save_keyring(keyring_path, make_keyring())
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(
            {
                "MAAS_BROKER_URL": url,
                "MAAS_KEYRING": str(keyring_path),
                "MAAS_DIAGNOSTIC_MODELS": "1",
                "MAAS_TENANT": "acme",
                "MAAS_MODEL_DIR": str(tmp / "models"),
                **extra_env,
            }
        )
        stack = Stack(url, tmp, keyring_path, env, redis.Redis.from_url(url))
        made.append((stack, server))
        return stack

    yield factory
    for stack, server in made:
        stack.stop_gateway()
        for w in stack.workers:
            # Nothing is at stake at teardown: do not sit through billiard's
            # 30 s wait when a task finished during the warm shutdown.
            w.stop(timeout_s=5)
        stack.backend.close()
        if server is not None:
            server.stop()


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack with one running worker, shared by the tests of a module."""
    tmp = tmp_path_factory.mktemp("shared")
    url, server = _redis_url()
    keyring_path = tmp / "keyring.json"
    save_keyring(keyring_path, make_keyring())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(
        {
            "MAAS_BROKER_URL": url,
            "MAAS_KEYRING": str(keyring_path),
            "MAAS_DIAGNOSTIC_MODELS": "1",
            "MAAS_TENANT": "acme",
        }
    )
    stack = Stack(url, tmp, keyring_path, env, redis.Redis.from_url(url))
    stack.start_worker("shared", concurrency=2)
    yield stack
    stack.stop_gateway()
    for w in stack.workers:
        w.stop()
    stack.backend.close()
    if server is not None:
        server.stop()


def message_envelope(raw: bytes) -> tuple[dict[str, Any], str]:
    """Decode a kombu Redis message: (message dict, the envelope argument)."""
    import base64

    msg = json.loads(raw)
    body = json.loads(base64.b64decode(msg["body"]))
    return msg, body[0][0]


def replace_envelope(raw: bytes, envelope: str) -> bytes:
    """Re-encode a kombu Redis message with another envelope argument."""
    import base64

    msg = json.loads(raw)
    body = json.loads(base64.b64decode(msg["body"]))
    body[0][0] = envelope
    msg["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(msg).encode()


#: The clients a behavioural test of the client runs against (`Stack.client`'s ``kind``).
CLIENT_KINDS = ("sync", "async", "gateway")


@pytest.fixture(params=CLIENT_KINDS)
def client_kind(request: pytest.FixtureRequest) -> str:
    """``"sync"``, ``"async"`` then ``"gateway"``: a test using it runs against `Client`,
    `AsyncClient` and `Client(gateway_url=...)` (the stack's gateway process: one per
    stack, so one per module for `shared_stack`). A test that needs what only a direct
    Redis connection has skips the gateway kind with `not_through_gateway`."""
    kind: str = request.param
    return kind


def not_through_gateway(client_kind: str, why: str) -> None:
    """Skip the ``"gateway"`` kind of a `client_kind` test, saying why it does not apply."""
    if client_kind == "gateway":
        pytest.skip(f"not through the gateway: {why}")


#: The two worker modes every tenant-isolation test runs against: the flags that choose
#: them (none for the batch consumer, the default).
WORKER_MODES: dict[str, tuple[str, ...]] = {"task": ("--celery-tasks",), "batch": ()}


@pytest.fixture(params=list(WORKER_MODES))
def iso_stack(
    request: pytest.FixtureRequest, make_stack: Callable[..., Stack]
) -> Callable[..., Stack]:
    """`make_stack` whose workers run in one of the two modes (a test using it runs in both)."""

    def factory(**env: str) -> Stack:
        stack = make_stack(**env)
        stack.worker_args = WORKER_MODES[request.param]
        return stack

    return factory
