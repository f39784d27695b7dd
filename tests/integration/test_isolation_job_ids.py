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
import os
import signal
import uuid
from collections.abc import Callable

import pytest

from maas_worker.broker import fetch
from maas_worker.protocol import queue_for
from maas_worker.tenancy.keyring import TenantPolicy

from .attacker import (
    Attacker,
    assert_victims_done,
    keyspace,
    records_for,
    set_policy,
    victims,
    wait_audited_once,
    wait_drained,
)
from .conftest import Stack, wait_for

pytestmark = pytest.mark.integration
#: How long acme's job sleeps: longer than globex's echo takes on a loaded machine.
SLEEP_S = 6


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


def test_a_verbatim_copy_never_replaces_the_victims_reservation(
    iso_stack: Callable[..., Stack],
) -> None:
    """A copy under the victim's own delivery tag waits for the victim's reservation.

    Before: the take filed every entry's reservation with HSET. Globex copied
    acme's entry verbatim (its delivery tag too) into its own list while acme's
    job ran: the copy's reservation replaced acme's, and refusing the copy
    acknowledged that tag. A crash of the worker running acme's job then lost
    it: nothing was left to put it back. Now the copy is not taken while the tag
    is reserved; acme's job survives the crash and runs, and the copy is
    refused once, under globex, after acme's reservation ends.
    """
    stack = iso_stack(MAAS_VISIBILITY_TIMEOUT_S="3", MAAS_LEASE_S="3")
    attacker = Attacker(stack)
    client = stack.client("acme")
    job = client.submit("sleep", {"seconds": SLEEP_S}, priority="normal")
    victim_list = fetch.tenant_queue(queue_for("normal"), "acme")
    copy = json.loads(stack.backend.lindex(victim_list, -1))
    tag = copy["properties"]["delivery_tag"]
    doomed = stack.start_worker("doomed", concurrency=2)
    wait_for(lambda: job.status() == "running", 30, "acme's job running")
    held = stack.backend.hget("unacked", tag)
    attacker.push_to_own_list("normal", copy)
    # Globex's next job, behind the copy in its list: once it has run, the
    # copy has been taken in turn, or held back.
    after = attacker.client.submit("echo", {"after": 0}, priority="normal")
    assert after.result(timeout=30) == {"echo": {"after": 0}}
    assert stack.backend.hget("unacked", tag) == held  # still acme's reservation
    assert doomed.proc is not None
    os.killpg(doomed.proc.pid, signal.SIGSTOP)  # frozen: acme's job cannot end now
    try:
        # The crash must come while acme's job runs (else its result is stored).
        assert not stack.backend.exists(keyspace.result("acme", job.id)), "sleep too short"
    finally:
        doomed.kill()  # SIGKILL reaches the stopped processes too
    stack.start_worker("rescuer", concurrency=2)
    assert job.result(timeout=60)["slept"] >= SLEEP_S
    wait_audited_once(stack, job.id, "tampered", "globex", verified=False)
    wait_drained(stack)
