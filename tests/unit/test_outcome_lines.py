"""The worker's one log line per job: ``job '<id>' <outcome>[: <failure code>]``."""

from __future__ import annotations

import logging

from maas_worker.protocol import AuditReason, FailureCode, Outcome, ResultDoc
from maas_worker.worker.pipeline import Ended, Stop, finished_outcome, interrupted


def test_a_stored_result_ends_as_what_it_holds() -> None:
    assert finished_outcome(ResultDoc.success({}), True) == Ended(Outcome.SUCCEEDED)
    timed_out = interrupted("timeout", 1.0)
    assert finished_outcome(timed_out, True) == Ended(Outcome.FAILED, FailureCode.TIMEOUT)
    # a job cancelled while it ran stores a cancelled result: it is no failure
    assert finished_outcome(interrupted("cancelled", 1.0), True) == Ended(Outcome.CANCELLED)
    assert finished_outcome(timed_out, False) == Ended(Outcome.DUPLICATE)


def test_the_line_after_the_job_id() -> None:
    assert Ended(Outcome.SUCCEEDED).line == "succeeded"
    assert Ended(Outcome.FAILED, "bad_input").line == "failed: bad_input"
    assert Ended(Outcome.CANCELLED).line == "cancelled"
    assert Stop(AuditReason.POLICY).ended.line == "policy"
    lost = Stop(Outcome.FAILED, FailureCode.WORKER_LOST)
    assert lost.ended == Ended(Outcome.FAILED, "worker_lost")
    # a model's own code that is not one word does not break the line
    assert Ended(Outcome.FAILED, "bad input\njob 'x' succeeded").line == "failed: other"
    assert Ended(AuditReason.POLICY).level == logging.WARNING
    assert Ended(Outcome.FAILED, "timeout").level == logging.INFO
