"""What the gateway does, without HTTP: check sealed envelopes, enqueue, report, cancel.

Each public coroutine takes the tenant the bearer token authenticated and
returns `Reply` values (an HTTP status, a JSON body, an optional
``Retry-After``); http.py only frames them. The order of the checks on a
submitted envelope mirrors the worker's (docs/envelope.md section 4) up to
the point where the worker would need the encryption key: size, structure,
the credential's tenant, key lookup, MAC (constant time), time window and
lifetime cap, binding (task name, job id), policy, quota and backpressure,
then the enqueue. Every refusal of an envelope after the bearer check writes
one audit record naming the authenticated tenant.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio

from maas_worker.backend import functions, keyspace
from maas_worker.backend.audit import record_fields
from maas_worker.backend.redis import async_redis_client
from maas_worker.broker import shards
from maas_worker.client import markers
from maas_worker.client.core import Plan, Sealed, Step, adrive, arun_plan
from maas_worker.client.wire import MessageBuilder
from maas_worker.crypto.envelope import (
    Header,
    now_ms,
    parse_unverified_header,
    parse_unverified_tenant,
    verify,
)
from maas_worker.errors import (
    EnvelopeRejected,
    InvalidEnvelope,
    PolicyDenied,
    QueueFull,
    RateLimited,
    ServiceUnavailable,
    SubmitError,
    UnknownJob,
    UnknownModel,
    connection_cause,
)
from maas_worker.gateway.lanes import GatewayJob, TenantLane
from maas_worker.gateway.metrics import Metrics
from maas_worker.protocol import TASK_NAME, AuditReason, JobState, read_rejected_marker
from maas_worker.settings import MAX_JOB_TTL_S, Settings
from maas_worker.tenancy.cancellation import verify_token
from maas_worker.tenancy.gatekeys import GatewayKeyring, GatewayKeyringSource

log = logging.getLogger(__name__)

#: Bytes an envelope adds around its plaintext, at most (header, nonce, tag, MAC).
ENVELOPE_OVERHEAD = 1024
#: Retry-After (s) when Redis is out of reach or a queue is full.
UNAVAILABLE_RETRY_S = 1.0
#: Retry-After (s) when a tenant is at its cap on jobs in flight (no token time to give).
IN_FLIGHT_RETRY_S = 1.0
#: The job state the gateway reports when a sealed result is there to open.
COMPLETED = "completed"

#: HTTP status of each refusal reason of an envelope.
_STATUS = {
    AuditReason.OVERSIZE: 413,
    AuditReason.MALFORMED: 400,
    AuditReason.UNKNOWN_KEY: 401,
    AuditReason.TAMPERED: 401,
    AuditReason.EXPIRED: 422,
    AuditReason.POLICY: 403,
}
_MESSAGES = {
    AuditReason.OVERSIZE: "the envelope is larger than MAAS_MAX_INPUT_BYTES allows",
    AuditReason.MALFORMED: "not a well-formed request envelope for maas.infer (docs/envelope.md)",
    AuditReason.UNKNOWN_KEY: "the envelope does not authenticate",
    AuditReason.TAMPERED: "the envelope does not authenticate",
    AuditReason.EXPIRED: "the envelope is outside its time window (expired, or issued "
    "in the future: check the clock)",
}


@dataclass(frozen=True)
class Reply:
    """One answer: HTTP status, JSON body, and ``Retry-After`` seconds when it applies."""

    status: int
    body: dict[str, Any]
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


def error(status: int, code: str, message: str, retry_after_s: float | None = None) -> Reply:
    """A refusal: ``{"error": code, "message": message}``."""
    return Reply(status, {"error": code, "message": message}, retry_after_s)


@dataclass(frozen=True)
class _Refusal:
    """An envelope refused by `Gateway._screen`: the answer, and the audit record it
    owes (job id, reason, authenticated)."""

    reply: Reply
    audit: tuple[str, AuditReason, bool]


#: Not in a request's verdicts yet (None there means "allowed").
_UNCHECKED = Reply(0, {})


def job_url(job_id: str) -> str:
    """The path of a job's resource (the ``Location`` of its ``202``)."""
    return f"/v1/jobs/{job_id}"


#: The JSON of a batch item queued by its request (`accepted_item`), a canonical UUID
#: twice: laid out directly, as `Gateway._accepted`'s body says, key for key.
_ACCEPTED_ITEM = (
    '{"status":202,"job_id":"%s","state":"queued","url":"/v1/jobs/%s","duplicate":false}'
)


def accepted_item(header: Header) -> str:
    """The batch answer's item (compact JSON) for a job its request queued."""
    return _ACCEPTED_ITEM % (header.job_id, header.job_id)


class Gateway:
    """The state of one gateway process: keyring, Redis pools, one lane per tenant."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ring_source = GatewayKeyringSource(settings.gateway.keyring_path)
        self.backend: redis.asyncio.Redis = async_redis_client(
            settings.result_backend, tls=settings.redis_tls, ha=settings.redis_ha
        )
        #: One broker client per queue shard (on a Redis Cluster each pinned to the
        #: primary serving its shard): a tenant's lane pushes on its shard's.
        self.brokers: list[redis.asyncio.Redis] = [
            shards.async_broker_client(settings, k) for k in shards.all_shards(settings)
        ]
        self.broker: redis.asyncio.Redis = self.brokers[0]
        self.wire = MessageBuilder()
        self.metrics = Metrics()
        self._lanes: dict[str, TenantLane] = {}
        self._host = f"gateway@{socket.gethostname()}"
        #: Largest single envelope accepted (bytes).
        self.max_envelope_bytes = settings.max_input_bytes + ENVELOPE_OVERHEAD

    @property
    def keyring(self) -> GatewayKeyring:
        """The gateway keyring in force (re-read when its file changes)."""
        return self._ring_source.get()

    def lane(self, tenant: str) -> TenantLane:
        """The tenant's lane (made at its first request)."""
        lane = self._lanes.get(tenant)
        if lane is None:
            lane = self._lanes[tenant] = TenantLane(self, tenant)
        return lane

    def authenticate(self, token: str) -> str | None:
        """The tenant a bearer token names and proves, or None (constant time)."""
        return self.keyring.bearer_tenant(token)

    async def aclose(self) -> None:
        """Stop every waiter and close the pools."""
        for lane in self._lanes.values():
            await lane.aclose()
        for conn in (self.backend, *self.brokers):
            with contextlib.suppress(Exception):
                await conn.aclose()

    # -- audit ---------------------------------------------------------------------------
    async def _audit(self, tenant: str, job_id: str, reason: AuditReason, verified: bool) -> None:
        self.metrics.refused(reason)
        fields = record_fields(
            job_id=job_id,
            tenant=tenant,
            reason=reason,
            verified=verified,
            worker=self._host,
            detail="gateway",
        )
        try:
            await self.backend.xadd(
                keyspace.AUDIT_STREAM,
                fields,  # type: ignore[arg-type]
                maxlen=self.settings.audit_maxlen,
                approximate=True,
            )
        except redis.RedisError:
            log.error("audit write failed for job %s (reason %s)", fields["job_id"], reason)

    # -- submitting ------------------------------------------------------------------------
    async def check(
        self, tenant: str, raw: bytes, verdicts: dict[tuple[str, str], Reply | None] | None = None
    ) -> Header | Reply:
        """Check one envelope of ``tenant`` as far as the MAC key goes: its header, or the
        refusal (audited).

        ``verdicts`` (one dict per request) keeps the outcome of the policy and
        catalogue checks for each (model, priority) already checked in the request:
        they depend on nothing else, and a batch's envelopes mostly share one."""
        return await self._conclude(tenant, self._screen(tenant, raw, self.keyring), verdicts)

    async def _conclude(
        self,
        tenant: str,
        screened: Header | _Refusal,
        verdicts: dict[tuple[str, str], Reply | None] | None,
    ) -> Header | Reply:
        """`check` after `_screen`: the audit record of a refusal, the policy verdict."""
        if isinstance(screened, _Refusal):
            await self._audit(tenant, *screened.audit)
            return screened.reply
        header = screened
        if verdicts is None:
            verdicts = {}
        what = (header.model, header.priority)
        refused = verdicts.get(what, _UNCHECKED)
        if refused is _UNCHECKED:
            refused = verdicts[what] = await self._check_policy(tenant, *what)
        if refused is None:
            return header
        assert isinstance(refused, Reply)
        if refused.body["error"] == "policy":
            await self._audit(tenant, header.job_id, AuditReason.POLICY, True)
        return refused

    def _screen(self, tenant: str, raw: bytes, keyring: GatewayKeyring) -> Header | _Refusal:
        """The checks of `check` that need no I/O (no await: a batch's envelopes go
        through here one after the other at the cost of a function call each): the
        header, or the refusal and the audit record it owes."""
        if len(raw) <= self.max_envelope_bytes and parse_unverified_tenant(raw) != tenant:
            # Another tenant, or no tenant field at all: the whole header says which.
            try:
                claimed: Header | None = parse_unverified_header(raw)
            except InvalidEnvelope:
                claimed = None
            if claimed is not None and claimed.tenant != tenant:
                # Not audited under the envelope's tenant: that claim is unauthenticated.
                return _Refusal(
                    error(403, "policy", "the envelope names another tenant than the bearer token"),
                    (claimed.job_id, AuditReason.POLICY, False),
                )
        skew_ms = self.settings.clock_skew_s * 1000
        try:
            header = verify(
                raw,
                expect="request",
                keyring=keyring,
                max_bytes=self.max_envelope_bytes,
                skew_ms=skew_ms,
                max_lifetime_ms=MAX_JOB_TTL_S * 1000 + skew_ms,
            ).header
        except EnvelopeRejected as exc:
            reason = AuditReason(exc.reason)
            # The header verify parsed, if it got that far (unauthenticated unless it says).
            unverified = exc.unverified_header
            job_id = unverified.job_id if isinstance(unverified, Header) else ""
            return _Refusal(
                error(_STATUS[reason], reason.value, _MESSAGES[reason]),
                (job_id, reason, exc.authenticated),
            )
        if header.task != TASK_NAME or not keyspace.is_job_id(header.job_id):
            return _Refusal(
                error(
                    400,
                    "malformed",
                    f"the envelope's task must be {TASK_NAME!r} and its job id a lowercase, "
                    "hyphenated UUID",
                ),
                (header.job_id, AuditReason.MALFORMED, True),
            )
        return header

    async def _check_policy(self, tenant: str, model: str, priority: str) -> Reply | None:
        """The tenant's policy and the catalogue on (model, priority): None, or the refusal
        (not audited: `check` audits it for each envelope it refuses)."""
        lane = self.lane(tenant)
        try:
            if lane.needs_catalog(model, priority):
                await lane.served_models()
            lane.check(model, priority)
        except PolicyDenied as exc:
            return error(403, "policy", str(exc))
        except UnknownModel as exc:
            return error(422, "unknown_model", str(exc))
        except ServiceUnavailable as exc:
            return error(503, "unavailable", str(exc), UNAVAILABLE_RETRY_S)
        except SubmitError as exc:
            return error(400, "malformed", str(exc))
        return None

    async def submit(self, tenant: str, envelopes: Sequence[bytes]) -> list[Reply]:
        """Check and enqueue ``envelopes`` of ``tenant``: one `Reply` each, in order.

        Idempotent on the job id: the same envelope again is accepted again and
        not enqueued twice; another envelope with an id in use is a ``409``.
        """
        return [
            self._accepted(r, False) if isinstance(r, Header) else r
            for r in await self.submit_items(tenant, envelopes)
        ]

    async def submit_items(self, tenant: str, envelopes: Sequence[bytes]) -> list[Reply | Header]:
        """`submit`, where each envelope accepted and queued by this call is answered by
        its header alone (its ``202`` is `accepted_item`): a batch's answer costs no
        object per job it queued."""
        replies: list[Reply | Header | None] = [None] * len(envelopes)
        accepted: list[tuple[int, Sealed]] = []
        verdicts: dict[tuple[str, str], Reply | None] = {}
        screen = self._screen
        keyring = self.keyring  # one keyring for the whole request
        for n, raw in enumerate(envelopes):
            screened = screen(tenant, raw, keyring)
            if (
                type(screened) is Header
                and verdicts.get((screened.model, screened.priority), _UNCHECKED) is None
            ):
                accepted.append((n, (screened, raw)))  # the common case: no await
                continue
            checked = await self._conclude(tenant, screened, verdicts)
            if isinstance(checked, Reply):
                replies[n] = checked
            else:
                accepted.append((n, (checked, raw)))
        pinned = await self._pin(tenant) if accepted else None
        fresh, marked = await self._claim_ids(tenant, accepted, replies)
        by_priority: dict[str, list[tuple[int, Sealed]]] = {}
        for n, sealed in fresh:
            by_priority.setdefault(sealed[0].priority, []).append((n, sealed))
        for group in by_priority.values():
            outcome = await self._enqueue(tenant, [s for _, s in group], marked, pinned)
            for n, (header, _) in group:
                replies[n] = outcome if outcome is not None else header
        self.metrics.enqueued(len(fresh))
        return [r for r in replies if r is not None]

    def _accepted(self, header: Header, duplicate: bool) -> Reply:
        url = job_url(header.job_id)
        return Reply(
            202,
            {"job_id": header.job_id, "state": "queued", "url": url, "duplicate": duplicate},
            headers={"Location": url},
        )

    async def _claim_ids(
        self,
        tenant: str,
        accepted: list[tuple[int, Sealed]],
        replies: list[Reply | Header | None],
    ) -> tuple[list[tuple[int, Sealed]], set[str]]:
        """Record each job id with its envelope's hash and write its queued marker, in one
        library call before the send (`markers.claim`, ``FCALL`` of
        `functions.MARK_QUEUED`); return the jobs seen for the first time and the ids whose
        marker this wrote, and answer the others (same envelope: 202 again; another: 409).

        The marker is the one `ClientCore.marker_write` writes after the send (the lane
        skips that step): written here, a request costs the gateway one round trip less,
        and the records and markers of a batch cost one command and one reply
        (docs/benchmarks.md). A repeat never touches the marker of the job it repeats
        (the worker never deletes a marker: it expires with the idempotency record, same
        lifetime), and a marker already there is kept (``NX``). Written before the send,
        a marker of a job that then fails to enqueue is deleted with its record
        (`_enqueue`); a gateway killed in between leaves the job "queued" until its
        expiry, then "expired", as its idempotency record alone already did."""
        if not accepted:
            return [], set()
        result_ttl_s = self.settings.result_ttl_s
        sha256 = hashlib.sha256
        batch = markers.claim(
            tenant,
            [
                (h, sha256(raw).hexdigest(), _seen_ttl_s(h, result_ttl_s))
                for _, (h, raw) in accepted
            ],
            result_ttl_s,
        )
        try:
            answers = await markers.awrite(self.backend, batch)
        except redis.RedisError as exc:
            for n, _ in accepted:
                replies[n] = _unavailable(exc)
            return [], set()
        fresh = []
        marked: set[str] = set()
        for (n, (header, raw)), answer in zip(accepted, answers, strict=True):
            if answer in (markers.MARKED, markers.KEPT):
                fresh.append((n, (header, raw)))
                if answer == markers.MARKED:
                    marked.add(header.job_id)
            elif answer == markers.SAME:
                replies[n] = self._accepted(header, True)
            else:
                replies[n] = error(
                    409,
                    "conflict",
                    f"job id {header.job_id} is in use by another envelope of this tenant",
                )
        return fresh, marked

    async def _pin(self, tenant: str) -> Any:
        """With ``MAAS_REDIS_WAIT_REPLICAS``: where the tenant's writes go, noted before
        `_claim_ids` writes its markers (the flow's ``pin`` step, core.py), so the
        replicate step vouches for those too; None otherwise, or if the cluster's slot
        map cannot be read now (the flow then pins after the markers)."""
        if not self.settings.redis_ha.wait_replicas:
            return None
        try:
            return await self.lane(tenant)._carry_out(Step("pin"))
        except redis.RedisError:
            return None

    async def _enqueue(
        self, tenant: str, sealed: list[Sealed], marked: set[str], pinned: Any = None
    ) -> Reply | None:
        """Run the client's enqueue flow; None once queued, else the refusal (and the ids
        are released, with the queued markers `_claim_ids` wrote for them, so the same
        envelopes may be submitted again)."""
        lane = self.lane(tenant)
        try:
            await adrive(lane.enqueue_flow(sealed, pinned=pinned), lane._carry_out)
            return None
        except RateLimited as exc:
            reply = error(429, "rate_limited", str(exc), exc.retry_after_s or IN_FLIGHT_RETRY_S)
            await self._audit(tenant, sealed[0][0].job_id, AuditReason.RATE_LIMITED, True)
        except QueueFull as exc:
            reply = error(503, "queue_full", str(exc), exc.retry_after_s)
        except ServiceUnavailable as exc:
            # A send cut off midway may have queued some: releasing their ids lets the
            # caller resubmit, and the workers' claim runs each job once whatever.
            reply = error(503, "unavailable", str(exc), UNAVAILABLE_RETRY_S)
        except redis.RedisError as exc:
            reply = _unavailable(exc)
        keys = [keyspace.gateway_seen(tenant, h.job_id) for h, _ in sealed]
        keys += [keyspace.submitted(tenant, h.job_id) for h, _ in sealed if h.job_id in marked]
        with contextlib.suppress(redis.RedisError):
            await self.backend.delete(*keys)
        return reply

    # -- following ---------------------------------------------------------------------------
    async def status(self, tenant: str, job_id: str, wait_s: float = 0.0) -> Reply:
        """The job's state, reason and sealed result (base64) if any; with ``wait_s``, first
        wait up to that long (capped by MAAS_GATEWAY_MAX_WAIT_S) for it to end."""
        if not keyspace.is_job_id(job_id):
            return _unknown(job_id)
        try:
            body = await self._read(tenant, job_id)
            wait_s = min(wait_s, self.settings.gateway.max_wait_s)
            if body is not None and body["state"] in ("queued", "running") and wait_s > 0:
                lane = self.lane(tenant)
                fut = lane.waiter.watch(GatewayJob(lane, job_id))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, wait_s)
                body = await self._read(tenant, job_id)
        except ServiceUnavailable as exc:
            return error(503, "unavailable", str(exc), UNAVAILABLE_RETRY_S)
        except redis.RedisError as exc:
            return _unavailable(exc)
        return _unknown(job_id) if body is None else Reply(200, body)

    async def _read(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        keys = [
            keyspace.result(tenant, job_id),
            keyspace.rejected(tenant, job_id),
            keyspace.cancel(tenant, job_id),
            keyspace.claim(tenant, job_id),
            keyspace.submitted(tenant, job_id),
            keyspace.gateway_seen(tenant, job_id),
        ]
        sealed, rejected, cancel, claim, submitted, seen = await arun_plan(
            self.backend, Plan([("GET", k) for k in keys], lambda r: r)
        )
        body: dict[str, Any] = {"job_id": job_id, "reason": None, "result": None}
        if sealed is not None:
            body.update(self._result(tenant, job_id, sealed))
        elif rejected is not None:
            state, reason = read_rejected_marker(rejected)
            body.update(state=str(state), reason=reason)
        elif cancel is not None and verify_token(cancel, self.keyring, tenant, job_id):
            body["state"] = JobState.CANCELLED.value if claim in (None, b"done") else "running"
        elif claim is not None and claim != b"done":
            body["state"] = JobState.RUNNING.value
        elif submitted is not None:
            expires = int(submitted) if submitted.isdigit() else None
            late = expires is not None and now_ms() > expires + self.settings.clock_skew_s * 1000
            body["state"] = JobState.EXPIRED.value if late else JobState.QUEUED.value
        elif seen is not None:
            body["state"] = JobState.QUEUED.value  # accepted; its marker not written (yet)
        else:
            return None
        return body

    def _result(self, tenant: str, job_id: str, sealed: bytes) -> dict[str, Any]:
        """A stored result, checked with the MAC key (it cannot be opened here)."""
        try:
            header = verify(
                sealed,
                expect="result",
                keyring=self.keyring,
                max_bytes=self.settings.max_result_bytes + ENVELOPE_OVERHEAD,
                skew_ms=self.settings.clock_skew_s * 1000,
            ).header
        except InvalidEnvelope:
            header = None
        if header is None or header.job_id != job_id or header.tenant != tenant:
            return {"state": JobState.FAILED.value, "reason": "invalid_result"}
        return {"state": COMPLETED, "result": base64.b64encode(sealed).decode("ascii")}

    async def cancel(self, tenant: str, job_id: str) -> Reply:
        """Ask for the job to be cancelled, as its tenant (a MAC-signed cancel request)."""
        if not keyspace.is_job_id(job_id):
            return _unknown(job_id)
        lane = self.lane(tenant)
        job = GatewayJob(lane, job_id)
        try:
            reply = await functions.acall(lane.backend, *job.cancel_call())
            requested = job.cancel_reply(reply)
        except UnknownJob:
            return _unknown(job_id)
        except redis.RedisError as exc:
            return _unavailable(exc)
        return Reply(200, {"job_id": job_id, "cancel_requested": requested})

    async def healthy(self) -> bool:
        """True if the result store and every queue shard's Redis answer a PING."""
        try:
            await self.backend.ping()
            for broker in self.brokers:
                await broker.ping()
        except redis.RedisError:
            return False
        return True


def _seen_ttl_s(header: Header, result_ttl_s: int) -> int:
    """How long the gateway remembers a job id (s): the job's lifetime, then its result's."""
    return max(1, (header.expires_at_ms - header.issued_at_ms) // 1000) + result_ttl_s


def _unavailable(exc: BaseException) -> Reply:
    # The cause only (connection_cause): never a URL, which may hold a password.
    return error(
        503,
        "unavailable",
        f"Redis unavailable ({connection_cause(exc)}); retry later",
        UNAVAILABLE_RETRY_S,
    )


def _unknown(job_id: str) -> Reply:
    # The same answer for a job of another tenant as for none at all: no oracle.
    return error(404, "unknown_job", "no such job (never submitted by this tenant, or expired)")
