"""Attack 2: one job's failure is that job's alone, in both worker modes.

Before: an authentic job whose input nested ~200,000 levels deep raised
`RecursionError` in the batch consumer's parse; the whole batch was handed
back again and again, and after three rounds every other tenant's job in it
ended ``worker_lost`` without running. A Redis writer got the same with a
deeply nested message body. Now JSON from anyone else is bounded before it
is parsed, output that cannot be stored fails only its job, and any other
error while handling a job is counted against that job alone: retried a few
times, then failed (``internal_error``) and audited once: a dead letter.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable

import pytest

from maas_worker import JobFailed, JobRejected
from maas_worker.tenancy.keyring import TenantPolicy

from .attacker import (
    Attacker,
    assert_victims_done,
    celery_message,
    keyspace,
    set_policy,
    victims,
    wait_audited_once,
    wait_drained,
)
from .conftest import Stack

pytestmark = pytest.mark.integration
DEPTH = 100_000  # far past Python's recursion limit (about 1,000)


def test_poison_jobs_and_entries_fail_alone_and_their_batch_mates_run(
    iso_stack: Callable[..., Stack],
) -> None:
    stack = iso_stack()
    attacker = Attacker(stack)
    # An authentic job whose input nests far past Python's recursion limit.
    deep_input = str(uuid.uuid4())
    _, envelope = attacker.seal(b"[" * DEPTH + b"]" * DEPTH, job_id=deep_input)
    attacker.send(envelope, job_id=deep_input)
    # An authentic job whose output cannot be stored: Python's parser accepts
    # NaN, a result never may (strict JSON), and echo hands it back.
    nan_output = str(uuid.uuid4())
    _, envelope = attacker.seal(b'{"x": NaN}', job_id=nan_output)
    attacker.send(envelope, job_id=nan_output)
    # A Redis writer's entries: a body nested as deep, a whole entry too deep
    # to parse, and one deep in its headers.
    deep_body = str(uuid.uuid4())
    message = celery_message(deep_body, "x")
    message["body"] = base64.b64encode(b"[" * DEPTH + b"]" * DEPTH).decode()
    attacker.push_raw("normal", message)
    attacker.push_raw("normal", json.loads("[" * 900 + "]" * 900))  # type: ignore[arg-type]
    attacker.push_raw(
        "normal", celery_message(str(uuid.uuid4()), "x", origin=json.loads("[" * 500 + "]" * 500))
    )
    jobs = victims(stack, 8, priority="normal")  # behind them: the same batch
    stack.start_worker()
    assert_victims_done(jobs)
    wait_audited_once(stack, deep_input, "malformed", "globex")
    with pytest.raises(JobRejected):
        attacker.job(deep_input).result(timeout=5)
    with pytest.raises(JobFailed) as failed:
        attacker.job(nan_output).result(timeout=20)
    assert failed.value.reason == "internal_error"
    wait_audited_once(stack, deep_body, "malformed", "", verified=False)
    wait_drained(stack)
    assert "RecursionError" not in stack.worker_logs()


def test_a_job_that_keeps_failing_is_dead_lettered_not_requeued_for_ever(
    iso_stack: Callable[..., Stack],
) -> None:
    """An error in a job's own claim (its tenant's bucket made unusable in Redis)."""
    stack = iso_stack()
    set_policy(stack, "globex", TenantPolicy(("echo",), "normal", rate_per_s=100, burst=100))
    attacker = Attacker(stack)
    stack.backend.rpush(keyspace.bucket("globex"), "not", "a", "hash")
    job_id = str(uuid.uuid4())
    _, envelope = attacker.seal(b'{"x": 1}', job_id=job_id)
    attacker.send(envelope, job_id=job_id)
    jobs = victims(stack, 8, priority="normal")
    stack.start_worker()
    assert_victims_done(jobs)
    with pytest.raises(JobFailed) as failed:
        attacker.job(job_id).result(timeout=30)
    assert failed.value.reason == "internal_error"
    rec = wait_audited_once(stack, job_id, "malformed", "globex")
    assert "dead letter" in rec.detail
    wait_drained(stack)
    assert stack.outcomes(job_id) == ["failed"]


def test_an_entry_ending_in_a_decoy_delivery_tag_is_refused_and_holds_no_reservation(
    iso_stack: Callable[..., Stack],
) -> None:
    """The take reads a delivery tag at the entry's end without decoding the entry
    (pop_reserve.lua). An entry built so that its end names another tag than its
    ``properties.delivery_tag`` would be reserved under the decoy while kombu
    acknowledged the real one: the reservation would come back for ever. Both
    worker modes compare the tag with the parsed entry and refuse it, once."""
    stack = iso_stack()
    attacker = Attacker(stack)
    job_id = str(uuid.uuid4())
    _, envelope = attacker.seal(b'{"x": 1}', job_id=job_id)
    message = celery_message(job_id, envelope)
    decoy = str(uuid.uuid4())
    message["decoy"] = {"delivery_tag": decoy}  # after "properties": the entry's end
    assert json.dumps(message).endswith(f'"delivery_tag": "{decoy}"}}}}')
    attacker.push_to_own_list("normal", message)
    jobs = victims(stack, 4, priority="normal")
    stack.start_worker()
    assert_victims_done(jobs)
    # Unverified, and named after the tenant whose list it was in: only that
    # tenant's producers may push there.
    wait_audited_once(stack, job_id, "malformed", "globex", verified=False)
    wait_drained(stack)
    assert not stack.backend.exists(keyspace.result("globex", job_id))  # it never ran


def test_an_unreadable_entry_in_a_tenants_list_is_audited_under_that_tenant(
    iso_stack: Callable[..., Stack],
) -> None:
    """A producer that pushes garbage to its own list is the acting tenant of the
    refusal (its list, its role): the audit record names it, unverified, once."""
    stack = iso_stack()
    attacker = Attacker(stack)
    job_id = str(uuid.uuid4())
    message = celery_message(job_id, "x")
    message["headers"]["task"] = "maas.sample"  # not a job's task: refused before any key
    attacker.push_to_own_list("normal", message)
    jobs = victims(stack, 4, priority="normal")
    stack.start_worker()
    assert_victims_done(jobs)
    wait_audited_once(stack, job_id, "malformed", "globex", verified=False)
    wait_drained(stack)
