"""What a job queue may hold: the check every entry passes before it is run.

Whatever sits in a queue list was written by someone with Redis write
access. Both consumers (the Celery channel in transport.py and the batch
consumer) take an entry, parse its JSON and pass it through `check_message`
before anything else looks at it: the structure kombu relies on for every
queue, and for our queues the content type, the task name and the size,
without decoding the body. A refused entry is audited with the `Refused`
reason and dropped; it is never deserialised.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .app import TASK_NAME
from .monitoring import MONITOR_EXCHANGE, SAMPLE_TASK
from .settings import PRIORITIES, Settings, queue_for

#: The only task each consumed queue may carry.
_TASK_OF_QUEUE: dict[str, str] = {
    **{queue_for(p): TASK_NAME for p in PRIORITIES}, MONITOR_EXCHANGE: SAMPLE_TASK}
#: Bytes of a Celery message around the envelope (headers, properties, JSON, base64).
_MESSAGE_OVERHEAD = 16 * 1024


def max_body_chars(settings: Settings) -> int:
    """The longest message a job queue may hold: base64 of JSON around the base64 envelope."""
    return (settings.max_envelope_chars + _MESSAGE_OVERHEAD) * 4 // 3


class Refused(Exception):
    """A queue entry that must not reach Celery; ``reason`` is the audit reason."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason


def str_field(mapping: Any, key: str) -> str | None:
    """``mapping[key]`` if ``mapping`` is a dict and the value a string, else None."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, str) else None


def check_message(raw: Any, queue: str, *, max_body_chars: int) -> None:
    """Raise `Refused` (its ``reason``: ``malformed`` or ``oversize``) unless ``raw``
    is a message this queue may carry.

    Checks the structure kombu relies on (for every queue), and for our queues
    the content type, the task name and the body size, without decoding the body.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("properties"), dict):
        raise Refused("malformed", "not a kombu message")
    props = raw["properties"]
    if not str_field(props, "delivery_tag"):
        raise Refused("malformed", "no delivery tag")
    info = props.get("delivery_info")
    if info is not None and not isinstance(info, dict):
        raise Refused("malformed", "bad delivery_info")
    body = raw.get("body")
    if body is not None and not isinstance(body, str):
        raise Refused("malformed", "body is not text")
    if not isinstance(raw.get("headers", {}), dict):
        raise Refused("malformed", "headers are not a mapping")
    expected_task = _TASK_OF_QUEUE.get(queue)
    if expected_task is None:
        return  # Celery's own queues (remote control, events): structure only
    if raw.get("content-type") != "application/json" or \
            raw.get("content-encoding") not in ("utf-8", None):
        raise Refused("malformed", "content type is not JSON")
    if props.get("body_encoding") not in ("base64", None):
        raise Refused("malformed", "unknown body encoding")
    if str_field(raw.get("headers"), "task") != expected_task:
        raise Refused("malformed", f"not a {expected_task} message")
    if body is not None and len(body) > max_body_chars:
        raise Refused("oversize", "body over the size limit")
    try:
        base64.b64decode(body or "", validate=True)
    except (binascii.Error, ValueError):
        raise Refused("malformed", "body is not base64") from None
