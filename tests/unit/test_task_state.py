"""What a job's task event says: SUCCESS only for ``succeeded``, else the outcome's words."""

from __future__ import annotations

import pickle

import pytest

from maas_worker.errors import JobNotSucceeded
from maas_worker.protocol import AuditReason, FailureCode, JobOutcome, Outcome
from maas_worker.worker.task_state import not_succeeded


def test_only_a_succeeded_job_is_a_success() -> None:
    assert not_succeeded(Outcome.SUCCEEDED) is None


@pytest.mark.parametrize(
    ("outcome", "code", "words"),
    [
        (Outcome.FAILED, "bad_input", "failed: bad_input"),
        (Outcome.FAILED, FailureCode.TIMEOUT, "failed: timeout"),
        (Outcome.FAILED, FailureCode.WORKER_LOST, "failed: worker_lost"),
        (Outcome.FAILED, FailureCode.CANCELLED, "cancelled"),  # cancelled while it ran
        (Outcome.CANCELLED, None, "cancelled"),
        (AuditReason.EXPIRED, None, "expired"),
        (AuditReason.POLICY, None, "rejected: policy"),
        (AuditReason.UNKNOWN_KEY, None, "rejected: unknown_key"),
        (AuditReason.REPLAYED, None, "rejected: replayed"),
        (Outcome.DUPLICATE, None, "copy: duplicate"),
        (Outcome.FINISHED, None, "copy: finished"),
    ],
)
def test_every_other_outcome_is_a_failure_named_by_its_words(
    outcome: JobOutcome, code: str | None, words: str
) -> None:
    error = not_succeeded(outcome, code)
    assert isinstance(error, JobNotSucceeded)
    assert str(error) == words
    assert repr(error) == f"JobNotSucceeded({words!r})"  # what Flower's exception column shows


@pytest.mark.parametrize(
    "code", [None, "", "Bad Input", "x" * 33, "bad_input: the value 'secret' is not a number"]
)
def test_a_failure_code_that_is_not_a_short_word_never_reaches_an_event(code: str | None) -> None:
    assert str(not_succeeded(Outcome.FAILED, code)) == "failed: other"


def test_it_survives_the_trip_from_a_pool_child_to_the_worker() -> None:
    # Celery pickles the exception from the prefork child to the main process.
    error = not_succeeded(AuditReason.POLICY)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is JobNotSucceeded and again.args == ("rejected: policy",)
