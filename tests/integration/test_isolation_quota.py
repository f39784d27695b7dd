"""Attack 5: no key a tenant can write lets it run more than its quota.

Before: each job was charged once, by whichever side admitted it first,
and an admission marker keyed by job id told the other side it was paid.
Pre-setting ``maas:admit:<job>`` for each job let a tenant with rate 1/s and
burst 2 run 20 of 20 jobs (control: 2 of 20). Now workers charge every job
as they start it, inside the claim, against a bucket and an in-flight set
only workers write; the client's check is advisory (it writes only the
tenant's own ``pending`` set, which enforces nothing).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable

import pytest

from maas_worker.crypto.envelope import now_ms
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
from .conftest import Stack

pytestmark = pytest.mark.integration
RATE, BURST, JOBS = 0.05, 2, 20


def test_presetting_every_producer_key_buys_no_extra_jobs(iso_stack: Callable[..., Stack]) -> None:
    stack = iso_stack()
    set_policy(stack, "globex", TenantPolicy(("echo",), "normal", rate_per_s=RATE, burst=BURST))
    attacker = Attacker(stack)
    r = stack.backend
    far = now_ms() + 3_600_000
    ids = [str(uuid.uuid4()) for _ in range(JOBS)]
    for job_id in ids:
        r.set(f"maas:admit:{job_id}", "1")  # the old "already charged" marker
        r.set(f"maas:{{globex}}:admit:{job_id}", "1")  # and one in the tenant's keys
        r.zadd(keyspace.pending("globex"), {job_id: far})  # the advisory set
        r.set(keyspace.submitted("globex", job_id), str(far))
    started = time.monotonic()
    for job_id in ids:  # sent straight to the queue: the client's own check skipped
        _, envelope = attacker.seal(b'{"x": 1}', job_id=job_id)
        attacker.send(envelope, job_id=job_id)
    jobs = victims(stack, 6, priority="normal")
    stack.start_worker()
    assert_victims_done(jobs)
    wait_drained(stack)
    elapsed = time.monotonic() - started
    ran = [j for j in ids if attacker.job(j).status() == "succeeded"]
    limited = [j for j in ids if any(r.reason == "rate_limited" for r in records_for(stack, j))]
    # The bucket holds BURST tokens and refills RATE a second: no more ran.
    assert BURST <= len(ran) <= BURST + math.ceil(elapsed * RATE)
    assert sorted(ran + limited) == sorted(ids)
    for job_id in limited:
        wait_audited_once(stack, job_id, "rate_limited", "globex")
        assert attacker.job(job_id).status() == "rejected"
