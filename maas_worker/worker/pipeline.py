"""The job pipeline's stages, shared by the ``maas.infer`` task and the batch consumer.

This docstring is the one place the check order is written down; tasks.py, consumer.py,
README.md and docs/security.md (which explains each check) refer to it. Before the
pipeline, the consumer checks the queue entry (broker/entries.py). Then, each failing
closed, in this order::

    task argument and size (base64, or the claim-check payload)
    -> size -> version/type -> key lookup -> HMAC -> time window and lifetime cap
    -> binding: job id = task id, task name, queue, payload reference's tenant
    -> tenant policy (model, priority) -> memory headroom (else wait, unclaimed)
    -> replay claim with cancel check and quota charge (one Lua script)
    -> decrypt -> input size and bounded parse -> model (exists, verifies, signer allowed)
    -> [a private job: the model declares private evaluation -> the tenant's CKKS
       context: registered, matches the sealed digest, public, not below the minimum]
    -> run under the watchdog (time limits, cancellation) -> seal -> store write-once

Invariants:

* nothing is decrypted, claimed or charged before the HMAC has verified; a message
  that did not authenticate is audited and never changes any job's state, while a
  refused authenticated one is also marked so its client learns of it;
* a job is (tenant, job id), the tenant the authenticated one: every key a stage reads
  or writes is that tenant's, so one tenant's job can never close, pre-empt, cancel or
  read another's of the same id;
* the binding check sits before the claim (the design lists it after decrypt): the
  header is already authentic, so an envelope copied into a message with another task
  id can never take the real job's claim; the policy check sits before the claim too,
  so a job its tenant may not run takes no claim and is not charged.

Each stage either returns what the next one needs or raises `Stop` (the delivery is
over, with its outcome: already audited and recorded) or `Defer` (keep the message and
try again later: the job is busy elsewhere, or memory is short). Any other error while
handling an authenticated job is that job's own fault (`fault`): it is retried a few
times, then failed and audited, never requeued for ever and never charged to another
job. The Celery task (tasks.py) runs the stages for one message; the batch consumer
(consumer.py) runs each stage for a whole batch, with the Redis work of a stage
pipelined across the batch.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from maas_worker import jsonlimits
from maas_worker.backend import keyspace
from maas_worker.backend.claims import Claim, ClaimOutcome
from maas_worker.crypto.envelope import Header, Verified, now_ms, seal, verify
from maas_worker.errors import (
    ConfigError,
    EnvelopeRejected,
    KeyringError,
    ModelError,
    ModelRejected,
)
from maas_worker.models import Model
from maas_worker.monitoring import metrics
from maas_worker.private.ckks import ContextRefused, load_public
from maas_worker.private.evaluate import PrivateModel, private_spec
from maas_worker.private.params import is_digest, private_request
from maas_worker.protocol import (
    TENANT_RE,
    AuditReason,
    FailureCode,
    JobOutcome,
    JobState,
    Outcome,
    ResultDoc,
    payload_ref_tenant,
    queue_for,
)
from maas_worker.settings import MAX_JOB_TTL_S, Settings
from maas_worker.tenancy.cancellation import token_actor, verify_token
from maas_worker.tenancy.keyring import TenantPolicy
from maas_worker.tenancy.quota import admission_args, admission_keys
from maas_worker.worker.batching import DynamicBatcher
from maas_worker.worker.runtime import WorkerRuntime
from maas_worker.worker.watchdog import JobInterrupted

log = logging.getLogger(__name__)

#: How long a job waits (handed back with a delay) while the host is short of memory.
MEMORY_BACKOFF_S = 5.0
#: How long a job waits before it is retried after an error of its own (`fault`).
FAULT_BACKOFF_S = 1.0
#: Errors that are no job's fault: Redis out of reach, the keyring file
#: unreadable. The whole delivery (or batch) is handed back and retried once
#: they pass; nothing is counted against a job.
UNAVAILABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, KeyringError)


#: A failure code as an outcome line shows it.
_CODE_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


class Ended(NamedTuple):
    """How a delivery ended: its outcome, and a failed job's failure code (``timeout``)."""

    outcome: JobOutcome
    failure: str | None = None

    @property
    def line(self) -> str:
        """What the worker logs after ``job '<id>'``: ``succeeded``, ``failed: timeout``,
        ``cancelled``, or the reason of a refusal (``policy``)."""
        if not self.failure:
            return str(self.outcome)
        # A model chooses its own codes: one word, or the line says "other".
        code = self.failure if _CODE_RE.fullmatch(self.failure) else "other"
        return f"{self.outcome}: {code}"

    @property
    def level(self) -> int:
        """The line's log level: a refusal is a warning (it is also audited)."""
        return logging.WARNING if isinstance(self.outcome, AuditReason) else logging.INFO


class Stop(Exception):
    """The delivery is finished with ``outcome`` (a result stored or a rejection recorded).

    ``failure`` is the failure code of a failed job's stored result.
    """

    def __init__(self, outcome: JobOutcome, failure: str | None = None) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.failure = failure

    @property
    def ended(self) -> Ended:
        """The outcome and failure code together."""
        return Ended(self.outcome, self.failure)


class Defer(Exception):
    """Not now: keep the message and try it again after ``delay_s`` seconds."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.delay_s = delay_s


@dataclass(frozen=True)
class Prepared:
    """A claimed, decrypted, policy-checked job with its model, ready to run."""

    model: Model
    inputs: Any
    soft_s: float
    hard_s: float


HardHook = Callable[[], None]


def reject(
    rt: WorkerRuntime,
    job_id: str,
    reason: AuditReason,
    header: Header | None,
    *,
    authenticated: bool,
    detail: str = "",
    actor: str = "",
) -> None:
    """Audit a refused delivery; tell the job's client if the refusal is authenticated.

    An authenticated refusal (the header's MAC verified) is about the job
    the header names, of the header's tenant: that job is closed and its
    client's wait ends with `JobRejected` (the message's own task id, which
    whoever wrote the queue entry chose, is not trusted for that). A message
    that did not authenticate could have been sent by anyone with access to
    a queue, so it changes no job's state: it is audited, and a note lets
    the named job's client say so if its own wait times out.

    ``actor`` is the tenant the record names when it is known to be another
    than the header's (whose tenant list the message was queued in).
    """
    tenant = header.tenant if header is not None else ""
    if authenticated and header is not None:
        job_id = header.job_id
    rt.audit.record(
        job_id=job_id,
        tenant=actor or tenant,
        reason=reason,
        verified=authenticated,
        detail=detail,
    )
    if reason != AuditReason.REPLAYED and keyspace.is_job_id(job_id):
        if authenticated:
            rt.guard.mark_rejected(
                tenant,
                job_id,
                ttl_s=rt.settings.result_ttl_s,
                state=JobState.EXPIRED if reason == AuditReason.EXPIRED else JobState.REJECTED,
                reason=reason,
            )
        elif TENANT_RE.fullmatch(tenant):
            rt.guard.mark_suspect(tenant, job_id, ttl_s=rt.settings.result_ttl_s)
    # The delivery's outcome line (`Ended.line`: ``job '<id>' policy``) is its one log line.


def _stop(
    rt: WorkerRuntime,
    job_id: str,
    reason: AuditReason,
    header: Header | None = None,
    *,
    authenticated: bool = False,
) -> Stop:
    reject(rt, job_id, reason, header, authenticated=authenticated)
    return Stop(reason)


def refuse_unreadable(rt: WorkerRuntime, job_id: str, exc: BaseException) -> Stop:
    """A delivery our own pre-authentication code could not handle: refused ``malformed``.

    Only unauthenticated bytes have been read at that point, so no job's
    state changes; the error type (never its text) is logged and audited.
    """
    log.error(
        "job %r: refusing a message that raised %s before it was authenticated",
        job_id[:64],
        type(exc).__name__,
    )
    reject(
        rt,
        job_id,
        AuditReason.MALFORMED,
        None,
        authenticated=False,
        detail=f"unreadable: {type(exc).__name__}",
    )
    return Stop(AuditReason.MALFORMED)


# -- checks on untrusted bytes ------------------------------------------------------------
def request_text(rt: WorkerRuntime, job_id: str, args: Any, kwargs: Any) -> str:
    """The task's one argument (the base64 envelope or a payload reference), size-checked."""
    if (
        not isinstance(args, list | tuple)
        or len(args) != 1
        or kwargs
        or not isinstance(args[0], str)
    ):
        raise _stop(rt, job_id, AuditReason.MALFORMED)
    text: str = args[0]
    if len(text) > rt.settings.max_envelope_chars:
        raise _stop(rt, job_id, AuditReason.OVERSIZE)
    return text


def request_bytes(
    rt: WorkerRuntime, job_id: str, text: str, fetched: bytes | int | None = None
) -> bytes:
    """The sealed request: base64-decoded, or ``fetched`` from Redis for a payload reference.

    ``fetched`` is what `JobGuard.fetch_payload` returned for this job. Whatever
    is there is untrusted exactly like a message body.
    """
    tenant = payload_ref_tenant(text)
    if tenant is None:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _stop(rt, job_id, AuditReason.MALFORMED) from None
    if not tenant or not keyspace.is_job_id(job_id):
        raise _stop(rt, job_id, AuditReason.MALFORMED)
    if fetched == -1:
        raise _stop(rt, job_id, AuditReason.OVERSIZE)
    if not isinstance(fetched, bytes):
        # A finished job's request is deleted with its result stored: this
        # is a redelivery or a replay of it, not a broken message.
        if rt.backend.delete(keyspace.killed(tenant, job_id)):
            raise Stop(Outcome.FINISHED)
        reason = (
            AuditReason.REPLAYED
            if rt.backend.exists(keyspace.result(tenant, job_id))
            else AuditReason.MALFORMED
        )
        raise _stop(rt, job_id, reason)
    return fetched


def verify_request(
    rt: WorkerRuntime,
    job_id: str,
    data: bytes,
    *,
    task_name: str,
    routed: str | None,
    text: str,
    list_tenant: str | None = None,
) -> Verified:
    """Verify the envelope, then bind it to the message's task id, task name, queue,
    payload reference (``text``, the task argument) and tenant list.

    ``list_tenant`` is the tenant whose fair-share list the message was taken
    from (None: the queue's own list). Under the ACLs only that tenant's
    credentials push there, so a message sealed for another tenant was put
    there by the list's tenant (a copied envelope, to spend its victim's
    claim or to run in its own turn): refused ``tampered`` and audited under
    the list's tenant, the actor.
    """
    s = rt.settings

    def check() -> Verified:
        return verify(
            data,
            expect="request",
            keyring=rt.keyring.get(),
            max_bytes=s.max_envelope_chars,
            skew_ms=s.clock_skew_s * 1000,
            max_lifetime_ms=MAX_JOB_TTL_S * 1000 + s.clock_skew_s * 1000,
            crypto=rt.crypto,
        )

    try:
        try:
            verified = check()
        except EnvelopeRejected as exc:
            # A key not held yet may be one the operator just added (a new tenant,
            # a rotation) within the keyring's reload interval: look at the file
            # before a refusal that cannot be undone.
            if AuditReason(exc.reason) is not AuditReason.UNKNOWN_KEY or not rt.keyring.refresh():
                raise
            verified = check()
    except EnvelopeRejected as exc:
        header = exc.unverified_header if isinstance(exc.unverified_header, Header) else None
        # errors.py sits below protocol.py, so the error carries the reason as a string.
        raise _stop(
            rt, job_id, AuditReason(exc.reason), header, authenticated=exc.authenticated
        ) from None
    header = verified.header
    # -- authenticated from here on --------------------------------------------
    if not keyspace.is_job_id(header.job_id):
        raise _stop(rt, header.job_id, AuditReason.MALFORMED, header, authenticated=True)
    ref_tenant = payload_ref_tenant(text)
    if (
        header.job_id != job_id
        or header.task != task_name
        or (routed is not None and routed != queue_for(header.priority))
        or (ref_tenant is not None and ref_tenant != header.tenant)
    ):
        raise _stop(rt, job_id, AuditReason.TAMPERED, header)
    if list_tenant is not None and list_tenant != header.tenant:
        reject(
            rt,
            job_id,
            AuditReason.TAMPERED,
            header,
            authenticated=False,
            actor=list_tenant,
            detail=f"sealed for tenant {header.tenant}, queued in this tenant's list",
        )
        raise Stop(AuditReason.TAMPERED)
    return verified


def check_memory(rt: WorkerRuntime, header: Header) -> None:
    """`Defer` while the host is short of memory: not started, not claimed, not counted."""
    if rt.memory_pressure():
        log.warning(
            "job %s waits: host memory above %g%%", header.job_id, rt.settings.memory_high_water_pct
        )
        raise Defer(retry_delay_s(rt.settings, MEMORY_BACKOFF_S))


def tenant_policy(rt: WorkerRuntime, header: Header) -> TenantPolicy:
    """The job's tenant policy, checked against the job's model and priority.

    Before the claim, so a job its tenant may not run is refused (``policy``)
    before it takes a claim or is charged; ``unknown_key`` if the tenant left
    the keyring.
    """
    try:
        policy = rt.keyring.get().tenant(header.tenant).policy
    except KeyringError:
        raise _stop(
            rt, header.job_id, AuditReason.UNKNOWN_KEY, header, authenticated=True
        ) from None
    if not (policy.allows_model(header.model) and policy.allows_priority(header.priority)):
        raise _stop(rt, header.job_id, AuditReason.POLICY, header, authenticated=True)
    return policy


def retry_delay_s(s: Settings, wanted_s: float) -> float:
    """How long a message kept back waits: at most half the visibility timeout.

    The message is held unacknowledged until it is due; held longer than the
    visibility timeout, kombu's sweep would put a second copy back in the
    queue (each extra copy ends as a spurious ``replayed``).
    """
    return max(0.5, min(wanted_s, s.max_retry_delay_s))


# -- the claim ----------------------------------------------------------------------------
def window_ms(rt: WorkerRuntime, header: Header) -> int:
    """How long replay state for this job must be kept: its remaining lifetime (clamped)."""
    return keyspace.clamp_ttl_ms(
        max(0, header.expires_at_ms - now_ms()) + rt.settings.clock_skew_s * 1000
    )


def admission(header: Header, policy: TenantPolicy) -> tuple[list[str], list[str | float]] | None:
    """The quota charge the claim script runs with (None: the tenant has no quotas)."""
    if not policy.limited:
        return None
    return (
        admission_keys(header.tenant),
        admission_args(header.job_id, policy, header.expires_at_ms),
    )


def claim(rt: WorkerRuntime, verified: Verified, policy: TenantPolicy) -> Claim:
    """Try to take the job (one round trip); `settle_claim` decides what follows."""
    header = verified.header
    return rt.guard.claim_job(
        header.tenant,
        header.job_id,
        window_ms=window_ms(rt, header),
        admission=admission(header, policy),
    )


def settle_claim(rt: WorkerRuntime, verified: Verified, policy: TenantPolicy, first: Claim) -> None:
    """Return if the job is ours to run; else `Stop` (final) or `Defer` (``busy``)."""
    header = verified.header
    tenant, job_id = header.tenant, header.job_id
    outcome = first
    if outcome.outcome == ClaimOutcome.ERROR:
        assert outcome.error is not None
        raise outcome.error
    if outcome.outcome == ClaimOutcome.CANCELLED:
        if verify_token(outcome.cancel_token, rt.keyring.get(), tenant, job_id):
            rt.guard.close(tenant, job_id, window_ms=window_ms(rt, header))
            rt.quotas.release(tenant, job_id, policy)
            raise Stop(Outcome.CANCELLED)
        refuse_cancel(rt, header, outcome.cancel_token)
        outcome = rt.guard.claim_job(
            tenant,
            job_id,
            window_ms=window_ms(rt, header),
            admission=admission(header, policy),
            ignore_cancel=True,
        )
    if outcome.outcome == ClaimOutcome.REPLAYED:
        if rt.backend.delete(keyspace.killed(tenant, job_id)):
            raise Stop(Outcome.FINISHED)  # the copy of a job whose process was ended on purpose
        raise _stop(rt, job_id, AuditReason.REPLAYED, header, authenticated=True)
    if outcome.outcome == ClaimOutcome.RATE_LIMITED:
        raise _stop(rt, job_id, AuditReason.RATE_LIMITED, header, authenticated=True)
    if outcome.outcome == ClaimOutcome.EXHAUSTED:
        log.error(
            "job %s started %d times, each ending with a dead worker; failing it",
            job_id,
            rt.guard.max_attempts,
        )
        lost = ResultDoc.failure(
            FailureCode.WORKER_LOST,
            f"the job was started {rt.guard.max_attempts} times and its worker died each time",
        )
        raise Stop(*finish(rt, verified, lost))
    if outcome.outcome == ClaimOutcome.BUSY:
        # Another live worker runs this job. Do not run it twice, and do not
        # drop this copy either: if that worker dies, this copy is the job.
        raise Defer(retry_delay_s(rt.settings, rt.settings.lease_s))


def refuse_cancel(rt: WorkerRuntime, header: Header, token: str | bytes | None) -> None:
    """A cancel request for this job that its own tenant did not make: audit it, drop it.

    The record names who made it: another tenant whose own key signed it
    (``policy``, verified), or whatever it claims (``tampered``, unverified).
    The request is deleted (unless the job's tenant has replaced it since),
    so it blocks nothing: the job runs, and its own tenant's cancel counts.
    """
    actor, genuine = token_actor(token, rt.keyring.get(), header.job_id)
    rt.audit.record(
        job_id=header.job_id,
        tenant=actor,
        reason=AuditReason.POLICY if genuine else AuditReason.TAMPERED,
        verified=genuine,
        detail="cancel request for another tenant's job",
    )
    log.warning("job %s: refused a cancel request not made by its tenant", header.job_id)
    if token is not None:
        rt.guard.drop_cancel(header.tenant, header.job_id, token)


def fault(
    rt: WorkerRuntime, verified: Verified, policy: TenantPolicy | None, exc: BaseException
) -> Stop | Defer:
    """An error while handling this authenticated job: retry it, or give up on it.

    Gives back the job's claim and in-flight count (no-ops unless this
    process holds them), then counts the error per job in Redis: under
    `JobGuard.max_faults` the job is retried after `FAULT_BACKOFF_S`
    (`Defer`); at the limit it ends ``failed`` (``internal_error``) with a
    dead-letter audit record under its tenant (`Stop`). A Redis error here
    propagates: the caller hands the delivery back as for any outage.
    """
    header = verified.header
    rt.guard.release(header.tenant, header.job_id)
    if policy is not None:
        rt.quotas.release(header.tenant, header.job_id, policy)
    n = rt.guard.record_fault(header.tenant, header.job_id, window_ms=window_ms(rt, header))
    name = type(exc).__name__
    if n < rt.guard.max_faults:
        log.error(
            "job %s: %s while handling it (%d of %d); retrying",
            header.job_id,
            name,
            n,
            rt.guard.max_faults,
        )
        return Defer(retry_delay_s(rt.settings, FAULT_BACKOFF_S))
    log.error("job %s: %s while handling it, %d times; failing it", header.job_id, name, n)
    rt.audit.record(
        job_id=header.job_id,
        tenant=header.tenant,
        reason=AuditReason.MALFORMED,
        verified=True,
        detail=f"dead letter after {n} errors ({name})",
    )
    doc = ResultDoc.failure(
        FailureCode.INTERNAL_ERROR, f"handling the job failed {n} times; it will not be retried"
    )
    return Stop(*finish(rt, verified, doc))


# -- running ------------------------------------------------------------------------------
def prepare(rt: WorkerRuntime, verified: Verified, policy: TenantPolicy) -> Prepared | ResultDoc:
    """Decrypt, parse (bounded in size and depth), resolve the model.

    Returns the job ready to run, or a failed result document to store
    (a model that fails verification); raises `Stop` for a rejection.
    """
    header = verified.header
    job_id = header.job_id
    try:
        plaintext = verified.decrypt()
    except EnvelopeRejected:
        raise _stop(rt, job_id, AuditReason.TAMPERED, header, authenticated=True) from None
    if len(plaintext) > rt.settings.max_input_bytes:
        raise _stop(rt, job_id, AuditReason.OVERSIZE, header, authenticated=True)
    try:
        inputs = jsonlimits.loads(plaintext, max_depth=jsonlimits.MAX_INPUT_DEPTH)
    except ValueError:
        raise _stop(rt, job_id, AuditReason.MALFORMED, header, authenticated=True) from None
    del plaintext
    try:
        model = rt.registry.resolve(header.model, signers=policy.allowed_signers)
    except ModelRejected as exc:
        # The model exists but fails verification (audited model_rejected when
        # its load was refused): fail the job clearly; the worker serves on.
        return ResultDoc.failure(exc.reason, str(exc))
    except ModelError:
        raise _stop(rt, job_id, AuditReason.POLICY, header, authenticated=True) from None
    soft_s, hard_s = rt.settings.limits_for(header.model)
    request = private_request(inputs)
    if request is not None:
        return prepare_private(rt, verified, model, request, limits=(soft_s, hard_s))
    return Prepared(model, inputs, soft_s, hard_s)


def prepare_private(
    rt: WorkerRuntime,
    verified: Verified,
    model: Model,
    request: tuple[str, str],
    *,
    limits: tuple[float, float],
) -> Prepared | ResultDoc:
    """A private job (docs/private-inference.md): the model's affine layer on the tenant's
    ciphertext, under the tenant's registered public context.

    A context that is not registered, or a model without private evaluation, fails the
    job with a clear reason; a context that does not match its digest (``tampered``) or
    is below the parameter minimum, too large or holds a secret key (``policy``) is
    refused with one audit record.
    """
    header = verified.header
    digest, vector = request
    spec = private_spec(model)
    if spec is None:
        return ResultDoc.failure(
            "bad_input", f"{model.name}@{model.version} has no private evaluation"
        )
    if not is_digest(digest) or not vector:
        return ResultDoc.failure(
            "bad_input", "a private input is {'ckks': {'context': sha256, 'vector': base64}}"
        )
    key = keyspace.ckks_context(header.tenant, digest)

    def load() -> Any:
        size = rt.backend.strlen(key)
        if not size:
            raise _NoContext
        if size > rt.settings.private_max_context_bytes:
            raise ContextRefused(f"context of {size} bytes is over the limit", weak=True)
        data = rt.backend.get(key)
        if not isinstance(data, bytes):
            raise _NoContext
        return load_public(data, digest)

    try:
        context = rt.private.context(header.tenant, digest, load)
    except ConfigError:
        # No `private` extra on this worker: the job fails clearly, the worker serves on.
        return ResultDoc.failure(
            "unsupported", "this worker cannot run private jobs (no private extra)"
        )
    except _NoContext:
        return ResultDoc.failure(
            "unknown_context", "the job's CKKS context is not registered: register it again"
        )
    except ContextRefused as exc:
        reject(
            rt,
            header.job_id,
            AuditReason.POLICY if exc.weak else AuditReason.TAMPERED,
            header,
            authenticated=True,
            detail=f"ckks context refused: {exc.why}",
        )
        raise Stop(AuditReason.POLICY if exc.weak else AuditReason.TAMPERED) from None
    try:
        layer = rt.private.layer(model, spec)
    except ModelError as exc:
        return ResultDoc.failure(exc.reason, str(exc))
    return Prepared(PrivateModel(model.name, model.version, layer, context), vector, *limits)


class _NoContext(Exception):
    """The job's context is not (or no longer) registered."""


def run_one(
    rt: WorkerRuntime, verified: Verified, job: Prepared, *, on_hard_also: HardHook | None = None
) -> ResultDoc:
    """Run one job under the watchdog; the result document.

    ``on_hard_also`` runs (in the watchdog thread) just before the process is
    ended at the hard limit, after this job's failed result is stored.
    """
    header = verified.header

    refused: set[bytes | str] = set()

    def is_cancelled() -> bool:
        token = rt.backend.get(keyspace.cancel(header.tenant, header.job_id))
        if token is None or token in refused:
            return False
        if verify_token(token, rt.keyring.get(), header.tenant, header.job_id):
            return True
        refused.add(token)  # audited once, however often the watchdog asks
        refuse_cancel(rt, header, token)
        return False

    def on_hard(reason: str) -> None:
        # Runs in the watchdog thread just before this process is ended.
        rt.backend.set(
            keyspace.killed(header.tenant, header.job_id), "1", ex=rt.settings.result_ttl_s
        )
        finish(rt, verified, produced_by(job.model, interrupted(reason, job.soft_s)))
        if on_hard_also is not None:
            on_hard_also()

    # In the threads pool, a model listed in MAAS_BATCH runs in shared batches.
    batcher = (
        rt.batcher_for(job.model)
        if threading.current_thread() is not threading.main_thread()
        else None
    )
    runner = _Batched(batcher, job.soft_s) if batcher is not None else job.model
    try:
        with rt.watchdog.running(
            header.job_id,
            soft_limit_s=job.soft_s,
            hard_limit_s=job.hard_s,
            is_cancelled=is_cancelled,
            on_hard=on_hard,
        ):
            output = metrics.timed_predict(header, runner, job.inputs)
        doc = ResultDoc.success(output)
    except JobInterrupted as exc:
        doc = interrupted(exc.reason, job.soft_s)
    except ModelError as exc:
        doc = ResultDoc.failure(exc.reason, str(exc))
    except Exception as exc:
        # The exception text may quote the input: log its type only.
        log.error("job %s: model %s raised %s", header.job_id, header.model, type(exc).__name__)
        doc = _internal_error()
    return produced_by(job.model, doc)


def run_batch(
    rt: WorkerRuntime,
    jobs: Sequence[tuple[Verified, Prepared]],
    *,
    on_hard_also: HardHook | None = None,
) -> list[ResultDoc]:
    """Run jobs of one model in ONE ``predict_batch`` call; a result document each.

    The batch runs under the watchdog with the model's limits (every job of a
    batch has the same model, hence the same limits): past the soft limit
    every job of the call fails with ``timeout``; at the hard limit each gets
    that failed result stored before the process is ended. If the shared
    call raises, each job is run again on its own (`run_one`), so an input
    that breaks the model fails only its own job. A cancel is honoured before
    a job starts (the claim), not inside a shared call.
    """
    first = jobs[0][1]
    model: Any = first.model

    def on_hard(reason: str) -> None:
        for verified, job in jobs:
            rt.backend.set(
                keyspace.killed(verified.header.tenant, verified.header.job_id),
                "1",
                ex=rt.settings.result_ttl_s,
            )
            finish(rt, verified, produced_by(job.model, interrupted(reason, job.soft_s)))
        if on_hard_also is not None:
            on_hard_also()

    label = f"batch of {len(jobs)} ({jobs[0][0].header.job_id}, ...)"
    try:
        with rt.watchdog.running(
            label,
            soft_limit_s=first.soft_s,
            hard_limit_s=first.hard_s,
            is_cancelled=lambda: False,
            on_hard=on_hard,
        ):
            outputs = metrics.timed_predict_batch(
                [v.header for v, _ in jobs], model, [j.inputs for _, j in jobs]
            )
    except JobInterrupted as exc:
        return [produced_by(model, interrupted(exc.reason, first.soft_s)) for _ in jobs]
    except Exception as exc:
        log.error("batch of %d for %s raised %s", len(jobs), model.name, type(exc).__name__)
        if len(jobs) == 1:
            return [produced_by(model, _internal_error())]
        log.info("running the %d jobs of that batch one by one", len(jobs))
        return [run_one(rt, v, j, on_hard_also=on_hard_also) for v, j in jobs]
    log.debug("batch of %d for %s", len(jobs), model.name)
    return [
        produced_by(
            model,
            ResultDoc.failure(out.reason, str(out))
            if isinstance(out, ModelError)
            else ResultDoc.success(out),
        )
        for out in outputs
    ]


def can_batch(model: Model) -> bool:
    """Whether ``model`` runs many jobs' inputs in one call (``predict_batch``)."""
    return callable(getattr(model, "predict_batch", None))


def produced_by(model: Model, doc: ResultDoc) -> ResultDoc:
    """``doc`` naming the model version that ran the job (``name@version``).

    Sealed with the result, so its client learns which version answered (a
    bare model name resolves to the owner's signed release: docs/models.md).
    """
    return doc.produced_by(f"{model.name}@{model.version}")


def _internal_error() -> ResultDoc:
    return ResultDoc.failure(FailureCode.INTERNAL_ERROR, "the model failed")


class _Batched:
    """A model's `predict`, run through its dynamic batcher."""

    def __init__(self, batcher: DynamicBatcher, timeout_s: float) -> None:
        self._batcher = batcher
        self._timeout_s = timeout_s
        self.name = batcher.model.name
        self.version = batcher.model.version

    def predict(self, inputs: Any) -> dict[str, Any]:
        return self._batcher.predict(inputs, timeout_s=self._timeout_s)


def interrupted(reason: str, soft_s: float) -> ResultDoc:
    """The failed result of a job stopped by its time limit or a cancel."""
    if reason == "cancelled":
        return ResultDoc.failure(FailureCode.CANCELLED, "the job was cancelled")
    return ResultDoc.failure(FailureCode.TIMEOUT, f"the job exceeded its time limit ({soft_s:g} s)")


# -- the result ---------------------------------------------------------------------------
def _result_body(rt: WorkerRuntime, doc: ResultDoc) -> tuple[bytes, ResultDoc]:
    """The result document as JSON (or a failure document if it cannot be one), and that
    document."""
    try:
        body = doc.to_json()
    except (TypeError, ValueError, RecursionError):
        # A model's output that is not JSON (NaN, an object): this job fails,
        # with no detail that could quote its data.
        doc = ResultDoc.failure(
            FailureCode.INTERNAL_ERROR, "the model's output is not JSON", model=doc.model
        )
        body = doc.to_json()
    if len(body) > rt.settings.max_result_bytes:
        doc = ResultDoc.failure(
            FailureCode.OVERSIZE, "the result exceeds the size limit", model=doc.model
        )
        body = doc.to_json()
    return body, doc


def seal_result(rt: WorkerRuntime, verified: Verified, doc: ResultDoc) -> tuple[bytes, ResultDoc]:
    """The result envelope for ``doc``, bound to the request (its own nonce), and the
    document it holds (a failure document replaces output that cannot be stored)."""
    body, doc = _result_body(rt, doc)
    req = verified.header
    issued = now_ms()
    header = Header(
        "result",
        req.key_version,
        issued,
        issued + rt.settings.result_ttl_s * 1000,
        req.priority,
        req.tenant,
        req.job_id,
        req.task,
        req.model,
        req.digest(),
    )
    return seal(verified.keys, header, body, crypto=rt.crypto), doc


def finished_outcome(doc: ResultDoc, stored: bool) -> Ended:
    """How a delivery whose result ``doc`` was (or, ``duplicate``, was not) stored ended."""
    if not stored:
        return Ended(Outcome.DUPLICATE)
    if doc.ok:
        return Ended(Outcome.SUCCEEDED)
    if doc.cancelled:
        return Ended(Outcome.CANCELLED)
    return Ended(Outcome.FAILED, doc.error)


def finish(rt: WorkerRuntime, verified: Verified, doc: ResultDoc) -> Ended:
    """Seal and store the result write-once; how the delivery ended (for the log)."""
    header = verified.header
    sealed, doc = seal_result(rt, verified, doc)
    stored = rt.guard.store_result(
        header.tenant,
        header.job_id,
        sealed,
        result_ttl_s=rt.settings.result_ttl_s,
        replay_window_ms=window_ms(rt, header),
    )
    return finished_outcome(doc, stored)


def run_claimed(rt: WorkerRuntime, verified: Verified, policy: TenantPolicy) -> Ended:
    """Everything after the claim, for one job: how it ended."""
    try:
        job = prepare(rt, verified, policy)
    except Stop as stop:
        return stop.ended
    doc = job if isinstance(job, ResultDoc) else run_one(rt, verified, job)
    return finish(rt, verified, doc)
