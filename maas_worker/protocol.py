"""The shared wire vocabulary: names and strings producers, workers and clients agree on.

Everything here appears on the wire or in Redis (task and queue names, job
states, audit reasons, result documents) or in what users read (outcome
lines, ``status --json``), so every value is fixed: the enums are
`StrEnum`s, each member equal to (and serialised as) its documented string.
docs/envelope.md and docs/compute.md are the reference; tests/unit/test_protocol.py
pins them.

This is the bottom layer: it imports nothing of the project but `errors`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from maas_worker.errors import ConfigError, InvalidEnvelope

# -- task and queue names --------------------------------------------------------------
#: The Celery task that runs one job.
TASK_NAME = "maas.infer"
#: The Celery task beat broadcasts for resource samples (monitoring/samples.py).
SAMPLE_TASK = "maas.sample"
#: What a job's argument shows as (Celery's ``argsrepr``: Flower, events, logs).
ARGS_REPR = "('<sealed envelope>',)"
#: Fanout exchange (and the broadcast queue's name) that carries sample requests.
MONITOR_EXCHANGE = "maas.monitor"
#: A job queue is this prefix and the job's priority: ``maas.high``.
QUEUE_PREFIX = "maas."


class Priority(StrEnum):
    """A job's priority, highest first; the queue it travels in is `queue_for` of it."""

    #: Taken before any normal or low job.
    HIGH = "high"
    #: The default.
    NORMAL = "normal"
    #: Taken last (a reserved share still reaches it under load).
    LOW = "low"


#: The priority names, highest first (plain strings: CLI choices, settings keys).
PRIORITIES: tuple[str, ...] = tuple(p.value for p in Priority)
#: The envelope header's ``priority`` byte for each priority (docs/envelope.md 3.1).
PRIORITY_CODES: dict[str, int] = {
    Priority.HIGH.value: 0,
    Priority.NORMAL.value: 1,
    Priority.LOW.value: 2,
}


def queue_for(priority: str) -> str:
    """Return the Celery queue name that carries jobs of ``priority``."""
    if priority not in PRIORITIES:
        raise ConfigError(f"unknown priority {priority!r}; use one of {', '.join(PRIORITIES)}")
    return QUEUE_PREFIX + priority


#: Job queues in the order a worker consumes them: high first, low last.
QUEUE_NAMES: tuple[str, ...] = tuple(queue_for(p) for p in PRIORITIES)

# -- the task argument -------------------------------------------------------------------
#: A valid tenant name (it is part of Redis keys and payload references).
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: A tenant's fair-share weight (takes per turn, docs/compute.md) is 1 to this.
MAX_TENANT_WEIGHT = 100
#: A task argument ``ref:payload:<tenant>`` says "the sealed request waits at
#: the tenant's payload key of this job" (a large request: claim check).
PAYLOAD_REF_PREFIX = "ref:payload:"


def payload_ref(tenant: str) -> str:
    """The task argument of a claim-checked request of ``tenant``."""
    return PAYLOAD_REF_PREFIX + tenant


def payload_ref_tenant(arg: str) -> str | None:
    """The tenant named by a claim-check argument; None if ``arg`` is not one.

    Unverified (whoever wrote the queue entry chose it): it only says where to
    look, and the envelope found there must be that tenant's (pipeline.py).
    An argument that starts like a reference but names no valid tenant gives
    ``""``.
    """
    if not arg.startswith(PAYLOAD_REF_PREFIX):
        return None
    tenant = arg[len(PAYLOAD_REF_PREFIX) :]
    return tenant if TENANT_RE.fullmatch(tenant) else ""


# -- what happens to a job ---------------------------------------------------------------
class JobState(StrEnum):
    """What `Job.status` says (docs/compute.md "Job states")."""

    #: Submitted, not started (the submit marker holds its expiry).
    QUEUED = "queued"
    #: A worker holds its claim.
    RUNNING = "running"
    #: A result is stored.
    SUCCEEDED = "succeeded"
    #: A result is stored and says why (`ResultDoc.error`).
    FAILED = "failed"
    #: A worker refused an authenticated message of this job (`JobInfo.reason` says why).
    REJECTED = "rejected"
    #: Cancelled before or while running.
    CANCELLED = "cancelled"
    #: Waited past its expiry: refused by a worker, or still queued after it.
    EXPIRED = "expired"


class AuditReason(StrEnum):
    """Why a message was refused: the ``reason`` of an audit record (DESIGN's list).

    A refused job's pipeline outcome is its reason (`Outcome` covers the rest).
    """

    #: An HMAC, GCM tag or binding (task id, name, queue, tenant) did not check.
    TAMPERED = "tampered"
    #: The job already ran or is closed: a copy, never run twice.
    REPLAYED = "replayed"
    #: Outside the envelope's time window (past its expiry, or issued in the future).
    EXPIRED = "expired"
    #: The tenant or key version is not (or no longer) in the keyring.
    UNKNOWN_KEY = "unknown_key"
    #: Not a well-formed message, envelope or input; a lifetime over the cap; a dead letter.
    MALFORMED = "malformed"
    #: Over a size limit.
    OVERSIZE = "oversize"
    #: The tenant may not do this (model, priority, another tenant's job, remote control).
    POLICY = "policy"
    #: The tenant is over its rate or its cap on jobs in flight.
    RATE_LIMITED = "rate_limited"
    #: A model version failed verification at load (job id and tenant empty).
    MODEL_REJECTED = "model_rejected"


#: Separates the state from the reason in a job's rejected marker (``rejected:policy``).
_MARKER_SEP = ":"


def rejected_marker(state: JobState, reason: AuditReason | None = None) -> str:
    """The value of a job's rejected marker (docs/envelope.md 3): ``expired``, or
    ``rejected`` followed by ``:<reason>`` when the refusal's reason is given.

    Clients before 0.2 read any value but ``expired`` as ``rejected``, so they
    keep working; newer ones learn the reason (`read_rejected_marker`).
    """
    if state == JobState.EXPIRED:
        return JobState.EXPIRED.value
    if state != JobState.REJECTED:
        raise ValueError(f"a rejected marker holds rejected or expired, not {state!r}")
    return state.value + (_MARKER_SEP + reason.value if reason is not None else "")


def read_rejected_marker(value: bytes | str) -> tuple[JobState, AuditReason | None]:
    """The state and reason a rejected marker holds (whatever a Redis writer left there).

    ``expired`` is `JobState.EXPIRED` (the state says why); anything else is
    `JobState.REJECTED`, with its reason only when that is an `AuditReason` (never
    other text).
    """
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if text == JobState.EXPIRED.value:
        return JobState.EXPIRED, None
    state, sep, word = text.partition(_MARKER_SEP)
    if sep and state == JobState.REJECTED.value:
        try:
            return JobState.REJECTED, AuditReason(word)
        except ValueError:
            pass
    return JobState.REJECTED, None


class Outcome(StrEnum):
    """How the pipeline ended a delivery that was not refused (the worker's log line).

    A refused delivery's outcome is its `AuditReason`.
    """

    #: Its result is stored and holds the output.
    SUCCEEDED = "succeeded"
    #: Its result is stored and holds a failure.
    FAILED = "failed"
    #: A result was already stored; this one was dropped (the first stays).
    DUPLICATE = "duplicate"
    #: Cancelled by its tenant before it started, or while it ran (its result says so).
    CANCELLED = "cancelled"
    #: A copy of a job whose process was ended on purpose; already finished.
    FINISHED = "finished"


#: How the pipeline ended a delivery: an `Outcome`, or the `AuditReason` it was refused for.
JobOutcome = Outcome | AuditReason


class FailureCode(StrEnum):
    """The ``error`` codes the worker itself writes into a failed `ResultDoc`.

    A model's `ModelError` adds its own (``bad_input``, ``model_error``, ...).
    """

    #: Past its soft time limit.
    TIMEOUT = "timeout"
    #: Cancelled while it ran.
    CANCELLED = "cancelled"
    #: Started too many times, its worker dying each time.
    WORKER_LOST = "worker_lost"
    #: The model or the worker failed on it (details are logged, never returned).
    INTERNAL_ERROR = "internal_error"
    #: The output exceeded ``MAAS_MAX_RESULT_BYTES``.
    OVERSIZE = "oversize"


# -- documents ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultDoc:
    """A job's result document: the plaintext of its result envelope (docs/envelope.md 5).

    ``{"ok": true, "output": ..., "model": ...}`` or ``{"ok": false, "error": ...,
    "message": ..., "model": ...}``, compact JSON, ``model`` (``name@version``)
    present only when a model ran. Build one with `success` or `failure`.
    """

    ok: bool
    #: The model's JSON output (successes only).
    output: Any = None
    #: A short code, never payload (failures only): a `FailureCode` or a model's own.
    error: str | None = None
    #: Text without payload (failures only).
    message: str = ""
    #: ``name@version`` of the model that ran the job; None if none ran.
    model: str | None = None

    @classmethod
    def success(cls, output: Any, *, model: str | None = None) -> ResultDoc:
        """The result of a job whose model returned ``output``."""
        return cls(True, output=output, model=model)

    @classmethod
    def failure(cls, error: str, message: str, *, model: str | None = None) -> ResultDoc:
        """The result of a job that failed with code ``error``."""
        return cls(False, error=error, message=message, model=model)

    def produced_by(self, model: str) -> ResultDoc:
        """This document naming the model version (``name@version``) that ran the job."""
        return replace(self, model=model)

    def to_json(self) -> bytes:
        """Compact JSON, members in the documented order.

        Raises `ValueError`, `TypeError` or `RecursionError` if the output is
        not JSON (NaN, an object, too deep).
        """
        doc: dict[str, Any] = {"ok": self.ok}
        if self.ok:
            doc["output"] = self.output
        else:
            doc["error"] = self.error
            doc["message"] = self.message
        if self.model is not None:
            doc["model"] = self.model
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, body: bytes) -> ResultDoc:
        """Read a result document (from an envelope already opened and bound to its job).

        Members it does not know are ignored; missing ones read as the client
        always read them. Raises `InvalidEnvelope` if ``body`` is not a JSON object.
        """
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidEnvelope() from None
        if not isinstance(doc, dict):
            raise InvalidEnvelope()
        model = doc.get("model")
        model = model if isinstance(model, str) else None
        if doc.get("ok"):
            return cls.success(doc.get("output", {}), model=model)
        return cls.failure(str(doc.get("error", "error")), str(doc.get("message", "")), model=model)

    @property
    def cancelled(self) -> bool:
        """Whether this is the result of a job cancelled while it ran."""
        return not self.ok and self.error == FailureCode.CANCELLED


def _dict_access(how: str) -> None:
    warnings.warn(
        f"Job.info() returns a JobInfo: {how} is deprecated and goes in 0.3; "
        "use its attributes (info.state) or info.as_dict()",
        DeprecationWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class JobInfo:
    """What `Job.info` returns: a job's state, failure reason and model.

    For one release it also reads like the dict ``info()`` used to return
    (``info["state"]``, ``dict(info)``, ``info == {...}``), with a
    `DeprecationWarning`.
    """

    job_id: str
    state: JobState
    #: The failure code of a ``failed`` job (``timeout``, ``bad_input``, ...), the audit
    #: reason of a ``rejected`` one (``policy``, ...; None if unknown); else None.
    reason: str | None = None
    #: ``name@version`` that ran the job, from its result; None until there is one.
    model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"job_id", "state", "reason", "model"}`` (what ``status --json`` prints)."""
        return asdict(self)

    # -- the dict API of before 0.2, deprecated ------------------------------------------
    def __getitem__(self, key: str) -> Any:
        _dict_access("info[key]")
        return self.as_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated: ``info.get(key)``; use the attribute."""
        _dict_access("info.get(key)")
        return self.as_dict().get(key, default)

    def keys(self) -> Iterator[str]:
        """Deprecated: the old dict's keys (also makes ``dict(info)`` work)."""
        _dict_access("info.keys()")
        return iter(self.as_dict())

    def items(self) -> Iterator[tuple[str, Any]]:
        """Deprecated: the old dict's items."""
        _dict_access("info.items()")
        return iter(self.as_dict().items())

    def __iter__(self) -> Iterator[str]:
        _dict_access("iterating over it")
        return iter(self.as_dict())

    def __contains__(self, key: object) -> bool:
        _dict_access("'key in info'")
        return key in self.as_dict()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, JobInfo):
            return self.as_dict() == other.as_dict()
        if isinstance(other, Mapping):
            _dict_access("comparing it with a dict")
            return self.as_dict() == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.job_id, self.state, self.reason, self.model))
