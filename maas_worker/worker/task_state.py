"""What Celery's task events, and so Flower, say about a job: SUCCESS only if it succeeded.

Flower builds each task's state from the workers' task events. A job whose delivery
did not succeed is reported as ``task-failed`` whose ``exception`` is a
`JobNotSucceeded` holding outcome and reason words only, never an exception's text,
the input or the output:

* ``succeeded``: SUCCESS (``result`` None, as before);
* ``failed``: FAILURE, ``failed: <code>`` (``failed: bad_input``, ``failed: timeout``);
* ``cancelled`` (before or while it ran): FAILURE, ``cancelled``;
* refused ``expired``: FAILURE, ``expired``;
* refused for another audit reason: FAILURE, ``rejected: <reason>`` (``rejected: policy``);
* ``duplicate`` or ``finished`` (a copy of a finished job): FAILURE, ``copy: <outcome>``.

A copy of a job that already has its result (``duplicate``, ``finished``, or the
refused ``replayed``) is never SUCCESS: Celery's event state keeps a task's SUCCESS
when a FAILURE arrives later for the same id, but not the other way round, so a copy
cannot turn a failed job green. The job's own state is ``maas-worker status``.

The Celery task raises the error (tasks.py); the batch consumer sends the same
``task-failed`` event itself (batch/events.py). Either way the message is acknowledged
exactly as before and Celery's result backend is not written (``ignore_result``).
A queue entry refused by the entry check (broker/entries.py) never became a task:
it sends no task event in either mode and is in the audit log only.
"""

from __future__ import annotations

import re

from maas_worker.errors import JobNotSucceeded
from maas_worker.protocol import AuditReason, FailureCode, JobOutcome, Outcome

#: A failure code as it may appear in an event: a short word, else ``other``
#: (a model's own code is its choice; an event never carries anything longer).
_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def not_succeeded(outcome: JobOutcome, code: str | None = None) -> JobNotSucceeded | None:
    """The error Celery reports for a delivery that ended with ``outcome``; None if it
    succeeded. ``code`` is the failure code of a ``failed`` one."""
    if outcome == Outcome.SUCCEEDED:
        return None
    if outcome == Outcome.FAILED and code == FailureCode.CANCELLED:
        outcome = Outcome.CANCELLED  # cancelled while it ran: `status` says cancelled too
    elif outcome == Outcome.FAILED:
        word = code if code is not None and _CODE_RE.fullmatch(code) else "other"
        return JobNotSucceeded(f"failed: {word}")
    if outcome in (Outcome.CANCELLED, AuditReason.EXPIRED):
        return JobNotSucceeded(str(outcome))
    if isinstance(outcome, AuditReason):
        return JobNotSucceeded(f"rejected: {outcome}")
    return JobNotSucceeded(f"copy: {outcome}")
