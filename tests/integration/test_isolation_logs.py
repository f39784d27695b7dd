"""Attack 7: nothing in a message can write a line into the worker's log.

Before: a job id holding a newline wrote a forged "job '...' succeeded" line
into the worker log (``%s`` formatting; Celery's own lines too). Now a job
id must be a canonical UUID: the transport refuses any other task id before
Celery reads it, the pipeline refuses a sealed header whose job id is not
one, and every line naming an untrusted id quotes it (``%r``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import pytest

from .attacker import Attacker, assert_victims_done, celery_message, victims
from .conftest import Stack, wait_for

pytestmark = pytest.mark.integration
FORGED_ID = "00000000-0000-4000-8000-000000000000"
FORGED = f"[2026-11-30 00:00:00,000: INFO/MainProcess] job '{FORGED_ID}' succeeded"
BAD_ID = "x\n" + FORGED


def test_a_job_id_cannot_forge_lines_in_the_worker_log(iso_stack: Callable[..., Stack]) -> None:
    stack = iso_stack()
    attacker = Attacker(stack)
    attacker.push_raw("normal", celery_message(BAD_ID, "QUJD"))  # a Redis writer's entry
    _, envelope = attacker.seal(b'{"x": 1}', job_id=BAD_ID)
    attacker.send(envelope, job_id=BAD_ID)  # Celery's own producer
    attacker.send(envelope, job_id=str(uuid.uuid4()))  # a sealed bad id
    jobs = victims(stack, 4, priority="normal")
    stack.start_worker()
    assert_victims_done(jobs)
    wait_for(
        lambda: len([r for r in stack.audit() if FORGED_ID in r.job_id]) >= 3,
        60,
        "the three refusals",
    )
    records = [r for r in stack.audit() if FORGED_ID in r.job_id]
    assert {r.reason for r in records} == {"malformed"}
    assert all("\n" not in r.job_id for r in records)
    logs = stack.worker_logs()
    assert not [line for line in logs.splitlines() if line.startswith(FORGED[:30])]
    assert not re.search(rf"job '{FORGED_ID}' succeeded\n", logs)
