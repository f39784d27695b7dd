"""The worker's guard at the Redis transport: what a Redis writer puts in a queue.

kombu's Redis channel pops a message with ``BRPOP``, parses it and hands it to
Celery. Whatever sits in a queue list was written by someone with Redis write
access, so before this guard:

* one entry that is not a kombu message (not JSON, no ``properties``, no
  delivery tag, a ``delivery_info`` without an exchange) raised inside the
  consumer loop, and Celery stopped the whole worker ("Unrecoverable error");
* ``delivery_info["routing_key"]``, which the pipeline compares with the
  priority in the sealed header, was whatever the message said, not the queue
  it was actually taken from;
* any registered task name (``maas.sample``, Celery's own ``celery.*``
  built-ins) could be sent to the job queues.

`HardenedChannel` keeps the consumer alive and the queue truthful: on the
job queues it lets through only well-formed protocol-2 JSON messages of
``maas.infer`` no larger than the envelope limit allows, and stamps each with
the queue it came from; on the monitoring queue only ``maas.sample``. Anything
else is dropped (it was already popped, so it is gone), logged and audited as
``malformed`` (``oversize`` for a body over the limit). It never deserialises
a refused body. Connection errors still propagate, so kombu reconnects.

Installed in worker processes by `install` (``tasks.py`` imports it): every
Redis URL form (``redis://``, ``rediss://``, ``redis+socket://``) resolves to
kombu's one Redis transport class, whose channel class this replaces.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

from .monitoring import MONITOR_EXCHANGE, SAMPLE_TASK
from .settings import PRIORITIES, Settings, queue_for

log = logging.getLogger(__name__)

INFER_TASK = "maas.infer"
#: The only task each consumed queue may carry.
_TASK_OF_QUEUE: dict[str, str] = {
    **{queue_for(p): INFER_TASK for p in PRIORITIES}, MONITOR_EXCHANGE: SAMPLE_TASK}
#: Bytes of a Celery message around the envelope (headers, properties, JSON, base64).
_MESSAGE_OVERHEAD = 16 * 1024


class _Refused(Exception):
    """A queue entry that must not reach Celery; ``reason`` is the audit reason."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason


def _str_field(mapping: Any, key: str) -> str | None:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, str) else None


def check_message(raw: Any, queue: str, *, max_body_chars: int) -> None:
    """Raise `_Refused` unless ``raw`` is a message this queue may carry.

    Checks the structure kombu relies on (for every queue), and for our queues
    the content type, the task name and the body size, without decoding the body.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("properties"), dict):
        raise _Refused("malformed", "not a kombu message")
    props = raw["properties"]
    if not _str_field(props, "delivery_tag"):
        raise _Refused("malformed", "no delivery tag")
    info = props.get("delivery_info")
    if info is not None and not isinstance(info, dict):
        raise _Refused("malformed", "bad delivery_info")
    body = raw.get("body")
    if body is not None and not isinstance(body, str):
        raise _Refused("malformed", "body is not text")
    if not isinstance(raw.get("headers", {}), dict):
        raise _Refused("malformed", "headers are not a mapping")
    expected_task = _TASK_OF_QUEUE.get(queue)
    if expected_task is None:
        return  # Celery's own queues (remote control, events): structure only
    if raw.get("content-type") != "application/json" or \
            raw.get("content-encoding") not in ("utf-8", None):
        raise _Refused("malformed", "content type is not JSON")
    if props.get("body_encoding") not in ("base64", None):
        raise _Refused("malformed", "unknown body encoding")
    if _str_field(raw.get("headers"), "task") != expected_task:
        raise _Refused("malformed", f"not a {expected_task} message")
    if body is not None and len(body) > max_body_chars:
        raise _Refused("oversize", "body over the size limit")
    try:
        base64.b64decode(body or "", validate=True)
    except (binascii.Error, ValueError):
        raise _Refused("malformed", "body is not base64") from None


def _job_id(raw: Any) -> str:
    headers = raw.get("headers") if isinstance(raw, dict) else None
    return _str_field(headers, "id") or ""


class _Auditor:
    """Audit records for refused queue entries, from the worker's main process."""

    def __init__(self) -> None:
        self._audit: Any = None

    def record(self, raw: Any, reason: str) -> None:
        try:
            if self._audit is None:
                from .audit import AuditLog
                from .runtime import backend_client

                settings = Settings.from_env()
                self._audit = AuditLog(backend_client(settings), maxlen=settings.audit_maxlen)
            self._audit.record(job_id=_job_id(raw), tenant="", reason=reason, verified=False)
        except Exception:  # never let auditing stop the consumer
            log.error("could not audit a refused queue entry", exc_info=False)


_auditor = _Auditor()


class HardenedChannel(kombu_redis.Channel):
    """kombu's Redis channel, refusing queue entries that are not our messages."""

    _max_body_chars: int | None = None

    def _limit(self) -> int:
        if self._max_body_chars is None:
            # The whole message is base64 of JSON around the base64 envelope.
            self._max_body_chars = (Settings.from_env().max_envelope_chars
                                    + _MESSAGE_OVERHEAD) * 4 // 3
        return self._max_body_chars

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        """Consume ``queue``, every delivery checked first (see the module docstring)."""
        ret = super().basic_consume(queue, *args, **kwargs)  # type: ignore[no-untyped-call]
        inner: Callable[[Any], Any] = self.connection._callbacks[queue]
        fanout = queue in self._fanout_queues

        def deliver(raw: Any) -> Any:
            try:
                check_message(raw, queue, max_body_chars=self._limit())
            except _Refused as exc:
                log.warning("queue %s: refused an entry (%s): %s", queue, exc.reason, exc)
                _auditor.record(raw, exc.reason)
                return None
            if not fanout:
                # The list it was popped from, not what the message claims: the
                # pipeline checks the sealed priority against this, and a
                # restored (unacked) message goes back to this same list.
                raw["properties"]["delivery_info"] = {"exchange": "", "routing_key": queue}
            try:
                return inner(raw)
            except (*self.connection.connection_errors, *self.connection.channel_errors):
                raise
            except Exception as exc:
                # Celery could not take it after all. Drop it from the
                # reservations too: a message held unacknowledged forever
                # would use up the prefetch and stop this worker consuming.
                log.warning("queue %s: refused an entry Celery could not read (%s)",
                            queue, type(exc).__name__)
                tag = raw["properties"]["delivery_tag"]
                if tag in self.qos._delivered:
                    self.qos.ack(tag)
                _auditor.record(raw, "malformed")
                return None

        self.connection._callbacks[queue] = deliver
        return ret

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        except (Empty, *self.connection.connection_errors,
                *self.connection.channel_errors):
            raise
        except Exception as exc:
            # An entry kombu could not even parse (not JSON): it has been
            # popped; drop it instead of letting it stop the worker.
            log.warning("refused a queue entry that is not a message (%s)",
                        type(exc).__name__)
            _auditor.record(None, "malformed")
            return True


def install() -> None:
    """Make kombu's Redis transport use `HardenedChannel` in this process (idempotent)."""
    kombu_redis.Transport.Channel = HardenedChannel
