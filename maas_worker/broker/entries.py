"""What a job queue may hold: the check every entry passes before it is run.

Whatever sits in a queue list was written by someone with Redis write
access. Both consumers (the Celery channel in transport.py and the batch
consumer) take an entry, parse it (`parse_entry`: bounded in depth) and pass
it through `check_message` before anything else looks at it: the structure
kombu relies on for every queue, and for our queues the content type, the
task name, a canonical UUID task id, the size, and a body that is exactly a
task call (``[args, kwargs, embed]`` with no callbacks, errbacks, chain or
chord), parsed with the same bounds. A refused entry is audited with the
`Refused` reason and dropped.

The worker, not the message, decides when and for how long a job runs:
`sanitize_headers` rewrites the Celery headers of a job message that passed
the check to what our own client sends, before Celery reads them. Celery's
``expires`` would let a Redis writer make a worker discard a job silently,
``timelimit`` kill it, ``shadow`` rename it in the logs, ``group`` and stamps
steer result handling and revocation; an ``eta`` is kept only as far ahead
as our own retries set it (the pipeline's retry delay), so a message cannot
be parked in a worker's memory. Expiry is the sealed header's, checked by
the pipeline.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from maas_worker import jsonlimits
from maas_worker.backend.keyspace import is_job_id
from maas_worker.protocol import (
    ARGS_REPR,
    MONITOR_EXCHANGE,
    PRIORITIES,
    SAMPLE_TASK,
    TASK_NAME,
    AuditReason,
    queue_for,
)
from maas_worker.settings import Settings

#: The only task each consumed queue may carry.
_TASK_OF_QUEUE: dict[str, str] = {
    **{queue_for(p): TASK_NAME for p in PRIORITIES},
    MONITOR_EXCHANGE: SAMPLE_TASK,
}
#: Every list queue a worker consumes (besides Celery's own fanout and reply
#: queues): nothing else is, whatever ``add_consumer`` names.
CONSUMED_QUEUES: frozenset[str] = frozenset(_TASK_OF_QUEUE)
#: Bytes of a Celery message around the envelope (headers, properties, JSON, base64).
_MESSAGE_OVERHEAD = 16 * 1024
#: The job queues: messages there are jobs, run by the pipeline.
JOB_QUEUES: frozenset[str] = frozenset(queue_for(p) for p in PRIORITIES)
#: Parts of a task call's ``embed`` that make Celery send further tasks.
_WORKFLOW_KEYS = ("callbacks", "errbacks", "chain", "chord")
#: How far ahead an ``eta`` may be beyond the longest retry delay we set.
_ETA_SLACK_S = 5.0


def max_body_chars(settings: Settings) -> int:
    """The longest message a job queue may hold: base64 of JSON around the base64 envelope."""
    return (settings.max_envelope_chars + _MESSAGE_OVERHEAD) * 4 // 3


class Refused(Exception):
    """A queue entry that must not reach Celery; ``reason`` is the audit reason."""

    def __init__(self, reason: AuditReason, why: str) -> None:
        super().__init__(why)
        self.reason = reason


def str_field(mapping: Any, key: str) -> str | None:
    """``mapping[key]`` if ``mapping`` is a dict and the value a string, else None."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, str) else None


# A task id as kombu writes it in a message's headers: ``"id": "<uuid>"``. Bodies
# are base64 (no quotes) and other ids are named otherwise (``root_id``).
_ID_FIELD = re.compile(r'"id"\s*:\s*"([0-9a-f-]{36})"')


def unverified_entry_id(text: str) -> str:
    """The task id a queue entry too large or too deep to parse seems to carry, for its
    audit record only (whoever wrote the entry chose it); ``""`` if none."""
    m = _ID_FIELD.search(text)
    return m.group(1) if m else ""


def parse_entry(text: str | bytes, *, max_chars: int) -> Any:
    """A queue entry's JSON, bounded in size and depth; None if it is not such JSON."""
    try:
        return jsonlimits.loads(
            text, max_depth=jsonlimits.MAX_MESSAGE_DEPTH, max_size=max_chars + _MESSAGE_OVERHEAD
        )
    except ValueError:
        return None


def check_message(raw: Any, queue: str, *, max_body_chars: int) -> list[Any] | None:
    """Raise `Refused` (its ``reason``: ``malformed`` or ``oversize``) unless ``raw``
    is a message this queue may carry; for a job queue, return the decoded body.

    Checks the structure kombu relies on (for every queue), and for our queues
    the content type, the task name, the task id and the body size; a job
    queue's body must decode (base64, then JSON with bounded depth) to
    ``[args, kwargs, embed]`` with no workflow in ``embed``.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("properties"), dict):
        raise Refused(AuditReason.MALFORMED, "not a kombu message")
    props = raw["properties"]
    if not str_field(props, "delivery_tag"):
        raise Refused(AuditReason.MALFORMED, "no delivery tag")
    info = props.get("delivery_info")
    if info is not None and not isinstance(info, dict):
        raise Refused(AuditReason.MALFORMED, "bad delivery_info")
    body = raw.get("body")
    if body is not None and not isinstance(body, str):
        raise Refused(AuditReason.MALFORMED, "body is not text")
    if not isinstance(raw.get("headers", {}), dict):
        raise Refused(AuditReason.MALFORMED, "headers are not a mapping")
    expected_task = _TASK_OF_QUEUE.get(queue)
    if expected_task is None:
        return None  # Celery's own queues (remote control, events): structure only
    if raw.get("content-type") != "application/json" or raw.get("content-encoding") not in (
        "utf-8",
        None,
    ):
        raise Refused(AuditReason.MALFORMED, "content type is not JSON")
    if props.get("body_encoding") not in ("base64", None):
        raise Refused(AuditReason.MALFORMED, "unknown body encoding")
    if str_field(raw.get("headers"), "task") != expected_task:
        raise Refused(AuditReason.MALFORMED, f"not a {expected_task} message")
    if not is_job_id(str_field(raw.get("headers"), "id")):
        raise Refused(AuditReason.MALFORMED, "task id is not a canonical UUID")
    if body is not None and len(body) > max_body_chars:
        raise Refused(AuditReason.OVERSIZE, "body over the size limit")
    try:
        decoded = base64.b64decode(body or "", validate=True)
    except (binascii.Error, ValueError):
        raise Refused(AuditReason.MALFORMED, "body is not base64") from None
    if queue not in JOB_QUEUES:
        return None
    try:
        call = jsonlimits.loads(decoded, max_depth=jsonlimits.MAX_MESSAGE_DEPTH)
    except ValueError:
        raise Refused(AuditReason.MALFORMED, "body is not a JSON task call") from None
    if (
        not isinstance(call, list)
        or len(call) != 3
        or not isinstance(call[1], dict)
        or not isinstance(call[2], dict | None)
    ):
        raise Refused(AuditReason.MALFORMED, "body is not [args, kwargs, embed]")
    if call[2] and any(call[2].get(k) for k in _WORKFLOW_KEYS):
        raise Refused(
            AuditReason.MALFORMED, "callbacks, errbacks, chains and chords are not allowed"
        )
    return call


def sanitize_headers(raw: dict[str, Any], *, max_eta_s: float, now: datetime | None = None) -> None:
    """Replace a checked job message's Celery headers with the ones our client sends.

    Keeps the task id, the retry count (a small non-negative integer, else
    0) and an ``eta`` no further ahead than ``max_eta_s`` (else none: the
    pipeline decides). See the module docstring for why.
    """
    headers = raw.get("headers") or {}
    job_id = headers["id"]
    retries = headers.get("retries")
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries < 10**6:
        retries = 0
    raw["headers"] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": job_id,
        "shadow": None,
        "eta": _eta(headers.get("eta"), max_eta_s, now),
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": retries,
        "timelimit": [None, None],
        "root_id": job_id,
        "parent_id": None,
        "argsrepr": ARGS_REPR,
        "kwargsrepr": "{}",
        "origin": _origin(headers.get("origin")),
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def _eta(value: Any, max_eta_s: float, now: datetime | None) -> str | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        eta = datetime.fromisoformat(value)
    except ValueError:
        return None
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    if eta - now > timedelta(seconds=max_eta_s + _ETA_SLACK_S):
        return None
    return value


def _origin(value: Any) -> str | None:
    # The producer's name, shown by Flower: printable and short, or nothing.
    if isinstance(value, str) and len(value) <= 255 and value.isprintable():
        return value
    return None
