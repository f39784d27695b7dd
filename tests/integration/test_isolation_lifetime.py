"""Attack 1: an authentic job with an unbounded lifetime must not poison a queue.

Before: a job sealed with ``expires_at_ms = 2**64 - 1`` reached the claim
script, whose ``PEXPIRE`` failed after the attempt counter was bumped; the
task slept and requeued it for ever (no audit record, a traceback a second),
the queue never drained, and in batch mode every job sharing its batch never
ran. A tenant restricted to ``normal`` could do it on ``high``. Now the
worker caps every lifetime at its own maximum, right after the MAC: the job
is refused ``malformed`` (authenticated, under the attacker), once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from maas_worker import JobRejected
from maas_worker.crypto.envelope import now_ms
from maas_worker.settings import DEFAULT_CLOCK_SKEW_S, MAX_JOB_TTL_S

from .attacker import (
    Attacker,
    assert_victims_done,
    victims,
    wait_audited_once,
    wait_drained,
)
from .conftest import Stack

pytestmark = pytest.mark.integration


def test_an_unbounded_lifetime_is_refused_once_and_the_queue_drains(
    iso_stack: Callable[..., Stack],
) -> None:
    stack = iso_stack()
    attacker = Attacker(stack)
    poison = []
    # The largest expiry a header can hold, and one just over the cap; on high,
    # which globex may not use, and on normal, which it may.
    for lifetime in ("max-u64", "just-over-cap"):
        for priority in ("high", "normal"):
            job_id = str(uuid.uuid4())
            issued = now_ms()
            expires = (
                2**64 - 1
                if lifetime == "max-u64"
                else issued + (MAX_JOB_TTL_S + DEFAULT_CLOCK_SKEW_S + 1) * 1000
            )
            _, envelope = attacker.seal(
                b'{"x": 1}',
                priority=priority,
                job_id=job_id,
                issued_at_ms=issued,
                expires_at_ms=expires,
            )
            attacker.send(envelope, job_id=job_id, priority=priority)
            poison.append(job_id)
    # The victim's jobs queue up behind the poison, so a batch consumer takes
    # them in the same batch.
    jobs = victims(stack, 6, priority="high") + victims(stack, 4, priority="normal")
    stack.start_worker()
    assert_victims_done(jobs)
    for job_id in poison:
        wait_audited_once(stack, job_id, "malformed", "globex")
        with pytest.raises(JobRejected):
            attacker.job(job_id).result(timeout=5)
    wait_drained(stack)
    assert "Traceback" not in stack.worker_logs()
