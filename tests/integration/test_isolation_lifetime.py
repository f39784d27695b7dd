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
from maas_worker.settings import MAX_JOB_TTL_S

from .attacker import (
    Attacker,
    assert_victims_done,
    victims,
    wait_audited_once,
    wait_drained,
)
from .conftest import Stack

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("expires_at_ms", [
    2**64 - 1,                                       # the largest the header can hold
    None,                                            # just over the cap (set below)
], ids=["max-u64", "just-over-cap"])
def test_an_unbounded_lifetime_is_refused_once_and_the_queue_drains(
        iso_stack: Callable[..., Stack], expires_at_ms: int | None) -> None:
    stack = iso_stack()
    attacker = Attacker(stack)
    poison = []
    # globex may submit at normal at most: high is refused too, whichever comes first.
    for priority in ("high", "normal"):
        job_id = str(uuid.uuid4())
        header, envelope = attacker.seal(b'{"x": 1}', priority=priority, job_id=job_id)
        exp = header.issued_at_ms + (MAX_JOB_TTL_S + 31) * 1000 \
            if expires_at_ms is None else expires_at_ms
        _, envelope = attacker.seal(b'{"x": 1}', priority=priority, job_id=job_id,
                                    issued_at_ms=header.issued_at_ms, expires_at_ms=exp)
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
