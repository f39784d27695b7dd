"""The audit log: one record per rejected message, bounded, in a Redis stream.

A record holds the job id, the tenant (as claimed by the message, with
``verified`` saying whether its MAC checked), the reason, the time and the
worker (its Celery node name: `name_worker`); never payload, keys or
ciphertext. ``model_rejected`` records a model version refused at load (job
id and tenant empty) and carries a ``detail``: the model reference and the
check that failed, never a path or model bytes.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import redis

from maas_worker.backend import keyspace
from maas_worker.protocol import AuditReason

# The name operators route audit records by; it predates the backend/ folder.
log = logging.getLogger("maas_worker.audit")

#: The reasons a record may carry (the contract's list).
REASONS: frozenset[str] = frozenset(AuditReason)
#: Longest job id or tenant stored; anything longer is cut (it is untrusted).
_MAX_FIELD = 128


def name_worker(node: str) -> None:
    """Make this process's records (and its children's) name worker node ``node``.

    A worker calls it with its Celery node name (``celery@host``, ``-n``) before
    its pool starts: several nodes on one host, or hosts that share a hostname,
    are then told apart. A process that never calls it names its host.
    """
    AuditLog.node = node


@dataclass(frozen=True)
class AuditRecord:
    """One security event."""

    job_id: str
    tenant: str
    reason: str
    at: float
    worker: str = ""
    verified: bool = False
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``at`` in Unix seconds)."""
        return asdict(self)


def _clean(value: str) -> str:
    # Untrusted strings: keep them printable and short so a record cannot
    # forge extra lines in a terminal or log.
    return "".join(ch if ch.isprintable() else "?" for ch in value[:_MAX_FIELD])


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def record_fields(
    *, job_id: str, tenant: str, reason: AuditReason, verified: bool, worker: str, detail: str = ""
) -> dict[str, str]:
    """The stream entry of one record (`AuditLog.record`; the gateway writes the same
    with ``redis.asyncio``): untrusted strings cut and made printable."""
    if reason not in REASONS:
        raise ValueError(f"unknown audit reason {reason!r}")
    fields = {
        "job_id": _clean(job_id),
        "tenant": _clean(tenant),
        "reason": reason,
        "at": f"{time.time():.6f}",
        "worker": worker,
        "verified": "1" if verified else "0",
    }
    if detail:
        fields["detail"] = _clean(detail)
    return fields


class AuditLog:
    """Append to and read the audit stream.

    ``on_record`` hears the reason of every record this instance writes (the
    worker counts them in ``maas_refusals_total``); it is called before the
    write, so a refusal is counted even when Redis is out of reach, and an
    exception it raises is logged, never passed on.
    """

    #: The worker node this process's records name (`name_worker`); None: the host's.
    node: ClassVar[str | None] = None

    def __init__(
        self,
        client: redis.Redis,
        *,
        maxlen: int,
        on_record: Callable[[AuditReason], None] | None = None,
    ) -> None:
        self._r = client
        self._maxlen = maxlen
        self._host = socket.gethostname()
        self._on_record = on_record

    def record(
        self, *, job_id: str, tenant: str, reason: AuditReason, verified: bool, detail: str = ""
    ) -> None:
        """Append one record; never raises (a failed write is logged, not fatal).

        ``detail`` (optional, cut to 128 printable characters) must hold no
        payload, key or path: e.g. ``digits@2: signature does not verify``.
        """
        fields = record_fields(
            job_id=job_id,
            tenant=tenant,
            reason=reason,
            verified=verified,
            worker=AuditLog.node or self._host,
            detail=detail,
        )
        if self._on_record is not None:
            try:
                self._on_record(reason)
            except Exception:
                log.debug("audit record hook failed", exc_info=True)
        try:
            self._r.xadd(
                keyspace.AUDIT_STREAM,
                fields,  # type: ignore[arg-type]
                maxlen=self._maxlen,
                approximate=True,
            )
        except redis.RedisError:
            log.error("audit write failed for job %s (reason %s)", fields["job_id"], reason)

    def latest(self, limit: int = 50) -> list[AuditRecord]:
        """The newest records first."""
        rows = self._r.xrevrange(keyspace.AUDIT_STREAM, count=limit) or []
        out = []
        for _id, raw in rows:
            f = {_text(k): _text(v) for k, v in (raw or {}).items()}
            out.append(
                AuditRecord(
                    job_id=f.get("job_id", ""),
                    tenant=f.get("tenant", ""),
                    reason=f.get("reason", ""),
                    at=float(f.get("at", 0)),
                    worker=f.get("worker", ""),
                    verified=f.get("verified") == "1",
                    detail=f.get("detail", ""),
                )
            )
        return out
