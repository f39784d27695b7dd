"""The attacker of the tenant-isolation tests, and the stacks they run on in both worker modes.

The attacker is tenant ``globex`` as a real one would be: it holds only its
own exported keyring (``keys export``), can seal any envelope its own keys
can (any header field, any lifetime, any job id, any input bytes), and can
write the queues the way any producer can (Celery's own ``send_task`` with
every option it has, or raw entries). Tenant ``acme`` is the victim, an
honest client. Each test runs against a Celery worker and against a batch
consumer (``worker``'s default mode): the ``iso_stack`` fixture
(conftest.py) gives stacks of each mode.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from maas_worker import Client, Job
from maas_worker.backend import keyspace
from maas_worker.backend.audit import AuditRecord
from maas_worker.broker import fetch
from maas_worker.broker.backlog import read_backlog
from maas_worker.broker.fetch import ring
from maas_worker.crypto.envelope import Header, now_ms, seal
from maas_worker.protocol import ARGS_REPR, TASK_NAME, queue_for
from maas_worker.tenancy.keyring import TenantPolicy, load_keyring, save_keyring

from .conftest import Stack, wait_for

#: How long a victim's job may take with the attacker at work (jobs take
#: milliseconds alone); generous, so only a stalled service fails the test.
VICTIM_S = 20.0
WAIT_S = 60.0


def set_policy(stack: Stack, tenant: str, policy: TenantPolicy) -> None:
    """Change a tenant's policy in the stack's keyring (as ``keys policy`` does)."""
    stack.rotate_keyring(load_keyring(stack.keyring_path).with_policy(tenant, policy))


class Attacker:
    """Tenant ``globex`` with its own exported keyring and write access to the queues."""

    def __init__(self, stack: Stack, tenant: str = "globex") -> None:
        self.stack = stack
        self.tenant = tenant
        path = stack.tmp / f"{tenant}-export.json"
        save_keyring(path, load_keyring(stack.keyring_path).only(tenant))
        self.keyring_path = path
        self.client: Client = stack.client(tenant, keyring=path)
        self.key = self.client.keyring.tenant(tenant).primary()

    def seal(
        self,
        body: bytes,
        *,
        model: str = "echo",
        priority: str = "normal",
        job_id: str | None = None,
        issued_at_ms: int | None = None,
        expires_at_ms: int | None = None,
        tenant: str | None = None,
    ) -> tuple[Header, str]:
        """An envelope sealed with the attacker's own key, every header field its choice."""
        issued = now_ms() if issued_at_ms is None else issued_at_ms
        expires = issued + 60_000 if expires_at_ms is None else expires_at_ms
        header = Header(
            "request",
            self.key.version,
            issued,
            expires,
            priority,
            tenant or self.tenant,
            job_id or str(uuid.uuid4()),
            TASK_NAME,
            model,
        )
        return header, base64.b64encode(seal(self.key.keys(self.tenant), header, body)).decode()

    def send(self, envelope: str, *, job_id: str, priority: str = "normal", **options: Any) -> None:
        """Publish with Celery's own producer (``options``: expires, eta, time_limit...)."""
        self.client.app.send_task(
            TASK_NAME,
            args=[envelope],
            task_id=job_id,
            queue=queue_for(priority),
            argsrepr=ARGS_REPR,
            kwargsrepr="{}",
            **options,
        )

    def job(self, job_id: str) -> Job:
        """A handle on one of the attacker's own jobs."""
        return self.client.job(job_id)

    def push_raw(self, priority: str, message: dict[str, Any]) -> None:
        """LPUSH a queue entry of the attacker's making, and wake the consumers."""
        pipe = self.stack.backend.pipeline()
        pipe.lpush(queue_for(priority), json.dumps(message))
        ring(pipe)
        pipe.execute()

    def push_to_own_list(self, priority: str, message: dict[str, Any]) -> None:
        """Queue an entry in the attacker's own fair-share list of ``priority`` (all
        its producer role may write there), announced as a producer does."""
        pipe = self.stack.backend.pipeline(transaction=True)
        fetch.push(pipe, queue_for(priority), self.tenant, [json.dumps(message)])
        pipe.execute()


def celery_message(job_id: str, envelope: str, **headers: Any) -> dict[str, Any]:
    """A queue entry shaped exactly as kombu's Redis transport writes one."""
    body = base64.b64encode(
        json.dumps(
            [[envelope], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        ).encode()
    ).decode()
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_NAME,
            "id": job_id,
            "root_id": job_id,
            "retries": 0,
            "timelimit": [None, None],
            "argsrepr": ARGS_REPR,
            "kwargsrepr": "{}",
            **headers,
        },
        "properties": {
            "correlation_id": job_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "maas.normal"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def victims(
    stack: Stack, n: int = 6, *, priority: str = "high"
) -> list[tuple[Job, dict[str, Any]]]:
    """The victim tenant submits ``n`` echo jobs: (job, the input it sent)."""
    client = stack.client("acme")
    out = []
    for i in range(n):
        inputs = {"victim": i, "at": time.time()}
        out.append((client.submit("echo", inputs, priority=priority), inputs))
    return out


def assert_victims_done(jobs: list[tuple[Job, dict[str, Any]]]) -> None:
    """Every victim job returns its own result within `VICTIM_S`."""
    for job, inputs in jobs:
        assert job.result(timeout=VICTIM_S) == {"echo": inputs}


def records_for(stack: Stack, job_id: str) -> list[AuditRecord]:
    """The audit records naming ``job_id``."""
    return [r for r in stack.audit() if r.job_id == job_id]


def wait_audited_once(
    stack: Stack, job_id: str, reason: str, tenant: str, *, verified: bool = True
) -> AuditRecord:
    """Exactly one record for ``job_id``: this reason, under the tenant that acted."""
    rec = stack.wait_audit(job_id, reason, WAIT_S)
    assert (rec.tenant, rec.verified) == (tenant, verified)
    assert len(records_for(stack, job_id)) == 1, records_for(stack, job_id)
    return rec


def job_queues_drained(stack: Stack) -> bool:
    """No job message left in a queue or reserved (taken and not acknowledged)."""
    queues = {queue_for(p) for p in ("high", "normal", "low")}
    if read_backlog(stack.backend).total:
        return False
    return not any(
        json.loads(v)[2] in queues or fetch.split_tenant_queue(json.loads(v)[2])
        for v in stack.backend.hvals("unacked")
    )


def wait_drained(stack: Stack) -> None:
    """Wait until every job message has been taken and acknowledged."""
    wait_for(lambda: job_queues_drained(stack), WAIT_S, "the job queues to drain")


__all__ = [
    "VICTIM_S",
    "Attacker",
    "assert_victims_done",
    "celery_message",
    "job_queues_drained",
    "keyspace",
    "records_for",
    "set_policy",
    "victims",
    "wait_audited_once",
    "wait_drained",
]
