"""Attack 6: Celery's own headers and remote control never drop or steer a job silently.

Before: rewriting a queued message's ``headers.expires`` into the past made
Celery discard it ("Discarding revoked task"): no audit record, the status
stayed ``queued``, the client timed out; a remote-control ``revoke`` did the
same. Now the worker replaces a job message's Celery headers with its own
(expiry is the sealed header's; no ``timelimit``, ``shadow``, ``group`` or far
``eta`` from the message), and refuses ``revoke``/``terminate`` with a pointer
to ``maas-worker cancel`` and an audit record.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from .attacker import Attacker, records_for, wait_drained
from .conftest import Stack, wait_for

pytestmark = pytest.mark.integration
TIMEOUT = 30.0


def rewrite_headers(stack: Stack, job_id: str, priority: str, **headers: Any) -> None:
    """What a Redis writer does to a queued message: change its Celery headers in place."""
    for queue in stack.job_lists(priority):
        for i, raw in enumerate(stack.backend.lrange(queue, 0, -1)):
            msg = json.loads(raw)
            if msg["headers"]["id"] == job_id:
                msg["headers"].update(headers)
                stack.backend.lset(queue, i, json.dumps(msg))
                return
    raise AssertionError(f"{job_id} is not queued")


def test_rewritten_celery_headers_neither_drop_nor_delay_nor_kill_a_job(
    iso_stack: Callable[..., Stack],
) -> None:
    stack = iso_stack()
    client = stack.client("acme")
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    expired = client.submit("echo", {"h": "expires"})
    rewrite_headers(stack, expired.id, "normal", expires=past)
    parked = client.submit("echo", {"h": "eta"})
    rewrite_headers(stack, parked.id, "normal", eta=tomorrow)
    limited = client.submit("sleep", {"seconds": 1.5})
    rewrite_headers(stack, limited.id, "normal", timelimit=[0.2, 0.3])
    renamed = client.submit("echo", {"h": "shadow"})
    rewrite_headers(
        stack,
        renamed.id,
        "normal",
        shadow="celery.backend_cleanup",
        group=str(uuid.uuid4()),
        retries="many",
        stamped_headers=["x"],
        stamps={"x": "y"},
    )
    # The attacker's own job, sent with Celery's options for the same effects.
    attacker = Attacker(stack)
    own = str(uuid.uuid4())
    _, envelope = attacker.seal(b'{"own": 1}', job_id=own)
    attacker.send(
        envelope,
        job_id=own,
        expires=datetime.now(UTC) - timedelta(hours=1),
        time_limit=0.2,
        soft_time_limit=0.1,
    )
    stack.start_worker()
    assert expired.result(timeout=TIMEOUT) == {"echo": {"h": "expires"}}
    assert parked.result(timeout=TIMEOUT) == {"echo": {"h": "eta"}}
    assert limited.result(timeout=TIMEOUT)["slept"] >= 1.5
    assert renamed.result(timeout=TIMEOUT) == {"echo": {"h": "shadow"}}
    assert attacker.job(own).result(timeout=TIMEOUT) == {"echo": {"own": 1}}
    wait_drained(stack)
    logs = stack.worker_logs()
    assert "Discarding revoked task" not in logs and "TimeLimitExceeded" not in logs
    assert all(not records_for(stack, j.id) for j in (expired, parked, limited, renamed))


def test_a_remote_revoke_is_refused_audited_and_drops_nothing(
    iso_stack: Callable[..., Stack],
) -> None:
    stack = iso_stack()
    worker = stack.start_worker(concurrency=1)
    client = stack.client("acme")
    blocker = client.submit("sleep", {"seconds": 2})
    wait_for(lambda: blocker.status() == "running", TIMEOUT, "the first job to start")
    target = client.submit("echo", {"revoked": False})
    control = Attacker(stack).client.app.control
    for replies in (
        control.revoke(target.id, reply=True, timeout=5, destination=[worker.node]),
        control.terminate(
            blocker.id, signal="KILL", reply=True, timeout=5, destination=[worker.node]
        ),
    ):
        assert len(replies) == 1
        (answer,) = replies[0].values()
        assert "maas-worker cancel" in answer["error"]
    assert blocker.result(timeout=TIMEOUT)["slept"] >= 2
    assert target.result(timeout=TIMEOUT) == {"echo": {"revoked": False}}
    for job in (target, blocker):
        (rec,) = wait_for(lambda j=job: records_for(stack, j.id), TIMEOUT, "an audit record")
        assert rec.reason == "policy" and rec.tenant == "" and not rec.verified
        assert "refused" in rec.detail
    assert "Discarding revoked task" not in stack.worker_logs()
