"""Attack 3: job ids are per tenant; another tenant's job of the same id is untouched.

Before: job ids were one global namespace. Tenant A read B's queued job id
(from Redis or Flower) and enqueued its own authentic job under that id
first: A's job ran under the id, B's was refused ``replayed`` and never ran,
and B's ``result()``/``status()`` raised `InvalidEnvelope`. A job of A's
refused for ``policy`` or ``rate_limited`` closed B's id the same way. Now a
job is (tenant, job id): every key of its state is its tenant's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest

from maas_worker.broker import fetch
from maas_worker.protocol import queue_for
from maas_worker.tenancy.keyring import TenantPolicy

from .attacker import (
    Attacker,
    assert_victims_done,
    records_for,
    set_policy,
    victims,
    wait_audited_once,
    wait_drained,
)
from .conftest import Stack

pytestmark = pytest.mark.integration


def queued_ids(stack: Stack, priority: str) -> list[str]:
    """Job ids as anyone who can read a queue sees them."""
    return [
        json.loads(raw)["headers"]["id"]
        for queue in stack.job_lists(priority)
        for raw in stack.backend.lrange(queue, 0, -1)
    ]


def test_another_tenants_job_under_the_same_id_runs_apart(iso_stack: Callable[..., Stack]) -> None:
    stack = iso_stack()
    # Two tokens and no refill to speak of: the third of globex's echo jobs is over its rate.
    # High is allowed, so globex's jobs are taken before acme's queued ones.
    set_policy(stack, "globex", TenantPolicy(("echo",), "high", rate_per_s=0.001, burst=2))
    attacker = Attacker(stack)
    jobs = victims(stack, 5, priority="normal")
    x, y, z, w, _ = queued_ids(stack, "normal")[::-1]  # oldest first
    # The attacker's own authentic jobs, under the victim's ids, ahead of them:
    _, squat = attacker.seal(b'{"attacker": 1}', job_id=x, priority="high")
    attacker.send(squat, job_id=x, priority="high")  # runs under acme's id
    _, forbidden = attacker.seal(b'{"seconds": 0}', model="sleep", job_id=y, priority="high")
    attacker.send(forbidden, job_id=y, priority="high")  # refused: policy
    _, first = attacker.seal(b'{"n": 1}', job_id=z, priority="high")
    attacker.send(first, job_id=z, priority="high")  # with x, globex's two tokens...
    _, second = attacker.seal(b'{"n": 2}', job_id=w, priority="high")
    attacker.send(second, job_id=w, priority="high")  # ...so one of x, z, w: rate_limited
    stack.start_worker()
    assert_victims_done(jobs)
    for job, _ in jobs:
        assert job.status() == "succeeded"
        assert job.info().reason is None
    wait_audited_once(stack, y, "policy", "globex")
    wait_drained(stack)
    limited = [
        j for j in (x, z, w) if any(r.reason == "rate_limited" for r in records_for(stack, j))
    ]
    assert len(limited) == 1
    wait_audited_once(stack, limited[0], "rate_limited", "globex")
    assert attacker.job(limited[0]).status() == "rejected"
    # The attacker's squatting job ran as its own (unless it was the one over
    # the rate): it never saw, closed or replaced acme's job of that id.
    if x not in limited:
        assert attacker.job(x).result(timeout=20) == {"echo": {"attacker": 1}}


def test_a_forged_message_naming_a_victims_job_changes_nothing(
    iso_stack: Callable[..., Stack],
) -> None:
    """A message that does not authenticate (signed with the attacker's key, naming acme)."""
    stack = iso_stack()
    attacker = Attacker(stack)
    jobs = victims(stack, 3, priority="normal")
    target = jobs[0][0].id
    _, forged = attacker.seal(b'{"forged": 1}', job_id=target, tenant="acme")
    attacker.send(forged, job_id=target, priority="high")  # taken before the real one
    stack.start_worker()
    assert_victims_done(jobs)
    rec = wait_audited_once(stack, target, "tampered", "acme", verified=False)
    assert rec.detail == ""
    wait_drained(stack)


def test_a_victims_entry_copied_into_the_attackers_own_list_is_refused_as_the_attackers(
    iso_stack: Callable[..., Stack],
) -> None:
    """Fair share: a job runs only from its own tenant's list.

    Before: the worker never compared the list a job was taken from with the
    tenant sealed in it. Tenant globex, whose producer role may push only to
    its own lists, copied acme's queued entry (as any reader of Redis sees it)
    into its own list: acme's job could run in globex's turn, and the copy
    that lost the race was audited ``replayed`` under acme. Now the copy is
    refused ``tampered``, audited once under globex (who put it there), and
    acme's job runs from acme's list.
    """
    stack = iso_stack()
    attacker = Attacker(stack)
    jobs = victims(stack, 3, priority="normal")
    victim_list = fetch.tenant_queue(queue_for("normal"), "acme")
    copy = json.loads(stack.backend.lindex(victim_list, -1))  # acme's oldest
    copied = copy["headers"]["id"]
    copy["properties"]["delivery_tag"] = str(uuid.uuid4())
    attacker.push_to_own_list("normal", copy)
    stack.start_worker()
    assert_victims_done(jobs)
    rec = wait_audited_once(stack, copied, "tampered", "globex", verified=False)
    assert "acme" in rec.detail
    assert rec.worker == stack.workers[-1].node  # the Celery node, not only the host
    wait_drained(stack)
    for job, _ in jobs:
        assert job.status() == "succeeded"
