"""The ``maas.infer`` task: open the sealed job, run the model, seal the result.

Checks run in this order and fail closed (docs/security.md explains each):
size -> version/type -> key lookup -> time window -> HMAC -> task name/id
binding -> memory headroom -> replay claim with cancel check and quota
admission (one Lua script) -> decrypt -> tenant policy -> model -> run under
the watchdog (time limits, cancellation) -> seal -> store write-once. A
rejected message is acknowledged, audited and marked so its client learns of
it; the worker carries on with the next message.

The binding check sits before the claim (the design lists it after decrypt)
because after the HMAC the header is already authentic: checking it first
means an envelope copied into a message with another task id can never take
the real job's claim.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from typing import Any

from celery import Task, shared_task, signals
from celery.exceptions import Reject, Retry

from . import keyspace, metrics, transport
from .app import PAYLOAD_REF
from .batching import DynamicBatcher
from .cancellation import verify_token
from .envelope import Header, Verified, now_ms, seal, verify
from .errors import EnvelopeRejected, KeyringError, ModelError, ModelRejected
from .keys import TenantPolicy
from .quota import admission_args, admission_keys
from .runtime import Advertiser, WorkerRuntime, build_registry, get_runtime
from .settings import Settings, queue_for
from .watchdog import JobInterrupted

log = logging.getLogger(__name__)

# Worker processes import this module before their consumer connects: from
# then on what a Redis writer puts in a queue is checked before Celery sees it.
transport.install()

TASK_NAME = "maas.infer"
#: Pause before handing a message back when Redis or the keyring is unavailable,
#: so an outage is not a hot loop.
INFRA_BACKOFF_S = 1.0
#: How long a job waits (re-queued with a delay) while the host is short of memory.
MEMORY_BACKOFF_S = 5.0


def _reject(rt: WorkerRuntime, job_id: str, reason: str, header: Header | None,
            *, authenticated: bool) -> None:
    tenant = header.tenant if header is not None else ""
    rt.audit.record(job_id=job_id, tenant=tenant, reason=reason, verified=authenticated)
    if reason != "replayed":
        rt.guard.mark_rejected(job_id, ttl_s=rt.settings.result_ttl_s,
                               authenticated=authenticated,
                               state="expired" if reason == "expired" else "rejected")
    log.warning("job %r rejected: %s", job_id[:64], reason)


def _allowed_signers(rt: WorkerRuntime, header: Header) -> tuple[str, ...] | None:
    """The model signers the job's tenant accepts (None: any trusted signer)."""
    return rt.keyring.get().tenant(header.tenant).policy.allowed_signers


def _run_model(rt: WorkerRuntime, verified: Verified, plaintext: bytes) -> dict[str, Any] | str:
    """The result document, or an audit reason if the job must be rejected instead."""
    header = verified.header
    try:
        inputs = json.loads(plaintext)
    except ValueError:
        return "malformed"
    try:
        model = rt.registry.resolve(header.model, signers=_allowed_signers(rt, header))
    except ModelRejected as exc:
        # The model exists but fails verification (audited model_rejected when
        # its load was refused): fail the job clearly; the worker serves on.
        return {"ok": False, "error": exc.reason, "message": str(exc)}
    except ModelError:
        return "policy"
    soft_s, hard_s = rt.settings.limits_for(header.model)

    def is_cancelled() -> bool:
        token = rt.backend.get(keyspace.cancel(header.job_id))
        return verify_token(token, rt.keyring.get(), header.tenant, header.job_id)

    def on_hard(reason: str) -> None:
        # Runs in the watchdog thread just before this process is ended.
        rt.backend.set(keyspace.killed(header.job_id), "1", ex=rt.settings.result_ttl_s)
        _finish(rt, verified, _interrupted(reason, soft_s))

    # In the threads pool, a model listed in MAAS_BATCH runs in shared batches.
    batcher = rt.batcher_for(model) if threading.current_thread() \
        is not threading.main_thread() else None
    runner = _Batched(batcher, soft_s) if batcher is not None else model
    try:
        with rt.watchdog.running(header.job_id, soft_limit_s=soft_s, hard_limit_s=hard_s,
                                 is_cancelled=is_cancelled, on_hard=on_hard):
            output = metrics.timed_predict(header, runner, inputs)
        return {"ok": True, "output": output}
    except JobInterrupted as exc:
        return _interrupted(exc.reason, soft_s)
    except ModelError as exc:
        return {"ok": False, "error": exc.reason, "message": str(exc)}
    except Exception as exc:
        # The exception text may quote the input: log its type only.
        log.error("job %s: model %s raised %s", header.job_id, header.model,
                  type(exc).__name__)
        return {"ok": False, "error": "internal_error", "message": "the model failed"}


class _Batched:
    """A model's `predict`, run through its dynamic batcher."""

    def __init__(self, batcher: DynamicBatcher, timeout_s: float) -> None:
        self._batcher = batcher
        self._timeout_s = timeout_s
        self.name = batcher.model.name
        self.version = batcher.model.version

    def predict(self, inputs: Any) -> dict[str, Any]:
        return self._batcher.predict(inputs, timeout_s=self._timeout_s)


def _interrupted(reason: str, soft_s: float) -> dict[str, Any]:
    if reason == "cancelled":
        return {"ok": False, "error": "cancelled", "message": "the job was cancelled"}
    return {"ok": False, "error": "timeout",
            "message": f"the job exceeded its time limit ({soft_s:g} s)"}


def _seal_result(rt: WorkerRuntime, verified: Verified, doc: dict[str, Any]) -> bytes:
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > rt.settings.max_result_bytes:
        body = json.dumps({"ok": False, "error": "oversize",
                           "message": "the result exceeds the size limit"},
                          separators=(",", ":")).encode()
    req = verified.header
    issued = now_ms()
    header = Header("result", req.key_version, issued, issued + rt.settings.result_ttl_s * 1000,
                    req.priority, req.tenant, req.job_id, req.task, req.model,
                    req.digest())
    return seal(verified.keys, header, body)


def process(rt: WorkerRuntime, task: Task, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> str:
    """Run one delivery through the pipeline; returns the outcome (for logs and tests)."""
    job_id = str(task.request.id or "")
    s = rt.settings
    # -- checks on untrusted bytes -------------------------------------------
    if len(args) != 1 or kwargs or not isinstance(args[0], str):
        _reject(rt, job_id, "malformed", None, authenticated=False)
        return "malformed"
    text = args[0]
    if len(text) > s.max_envelope_chars:
        _reject(rt, job_id, "oversize", None, authenticated=False)
        return "oversize"
    if text == PAYLOAD_REF:
        # A large request: the sealed bytes wait raw in Redis (see client.py).
        # Whatever is there is untrusted exactly like a message body.
        fetched = rt.guard.fetch_payload(job_id, s.max_envelope_chars)
        if fetched == -1:
            _reject(rt, job_id, "oversize", None, authenticated=False)
            return "oversize"
        if not isinstance(fetched, bytes):
            # A finished job's request is deleted with its result stored: this
            # is a redelivery or a replay of it, not a broken message.
            if rt.backend.delete(keyspace.killed(job_id)):
                return "finished"
            reason = "replayed" if rt.backend.exists(keyspace.result(job_id)) else "malformed"
            _reject(rt, job_id, reason, None, authenticated=False)
            return reason
        data = fetched
    else:
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            _reject(rt, job_id, "malformed", None, authenticated=False)
            return "malformed"
    try:
        verified = verify(data, expect="request", keyring=rt.keyring.get(),
                          max_bytes=s.max_envelope_chars, skew_ms=s.clock_skew_s * 1000)
    except EnvelopeRejected as exc:
        header = exc.unverified_header if isinstance(exc.unverified_header, Header) else None
        _reject(rt, job_id, exc.reason, header, authenticated=False)
        return exc.reason
    header = verified.header
    # -- authenticated from here on ------------------------------------------
    routed = (task.request.delivery_info or {}).get("routing_key")
    if header.job_id != job_id or header.task != task.name or (
            routed is not None and routed != queue_for(header.priority)):
        _reject(rt, job_id, "tampered", header, authenticated=False)
        return "tampered"
    if rt.memory_pressure():
        # Not started, not claimed, not counted as an attempt: back in a while.
        log.warning("job %s waits: host memory above %g%%", header.job_id,
                    s.memory_high_water_pct)
        raise task.retry(countdown=_retry_delay_s(s, MEMORY_BACKOFF_S))
    try:
        policy = rt.keyring.get().tenant(header.tenant).policy
    except KeyringError:
        _reject(rt, job_id, "unknown_key", header, authenticated=True)
        return "unknown_key"
    outcome = _claim(rt, verified, policy)
    if outcome == "busy":
        # Another live worker runs this job. Do not run it twice, and do not
        # drop this copy either: if that worker dies, this copy is the job.
        raise task.retry(countdown=_retry_delay_s(s, s.lease_s))
    if outcome != "claimed":
        return outcome
    try:
        return _run_claimed(rt, verified, policy)
    finally:
        rt.quotas.release(header.tenant, header.job_id, policy)


def _retry_delay_s(s: Settings, wanted_s: float) -> float:
    """How long a message handed back with a delay waits: at most half the visibility timeout.

    The delayed copy is held unacknowledged by this worker until it is due;
    held longer than the visibility timeout, kombu's sweep would put a second
    copy back in the queue (each extra copy ends as a spurious ``replayed``).
    """
    return max(0.5, min(wanted_s, s.visibility_timeout_s / 2))


def _window_ms(rt: WorkerRuntime, header: Header) -> int:
    """How long replay state for this job must be kept: its remaining lifetime."""
    return max(0, header.expires_at_ms - now_ms()) + rt.settings.clock_skew_s * 1000


def _claim(rt: WorkerRuntime, verified: Verified, policy: TenantPolicy) -> str:
    """Take the job; anything but ``claimed`` is final for this delivery (or a retry)."""
    header = verified.header
    job_id = header.job_id
    admission = (admission_keys(header.tenant, job_id),
                 admission_args(job_id, policy, header.expires_at_ms)) if policy.limited else None
    claim = rt.guard.claim_job(job_id, window_ms=_window_ms(rt, header), admission=admission)
    if claim.outcome == "cancelled":
        if verify_token(claim.cancel_token, rt.keyring.get(), header.tenant, job_id):
            rt.guard.close(job_id, window_ms=_window_ms(rt, header))
            rt.quotas.release(header.tenant, job_id, policy)
            return "cancelled"
        # Not a cancel by the job's tenant: refuse the request, run the job.
        rt.audit.record(job_id=job_id, tenant=header.tenant, reason="tampered", verified=False)
        rt.backend.delete(keyspace.cancel(job_id))
        claim = rt.guard.claim_job(job_id, window_ms=_window_ms(rt, header),
                                   admission=admission, ignore_cancel=True)
    if claim.outcome == "replayed":
        if rt.backend.delete(keyspace.killed(job_id)):
            return "finished"  # the copy of a job whose process was ended on purpose
        _reject(rt, job_id, "replayed", header, authenticated=True)
        return "replayed"
    if claim.outcome == "rate_limited":
        _reject(rt, job_id, "rate_limited", header, authenticated=True)
        return "rate_limited"
    if claim.outcome == "exhausted":
        log.error("job %s started %d times, each ending with a dead worker; failing it",
                  job_id, rt.guard.max_attempts)
        lost: dict[str, Any] = {
            "ok": False, "error": "worker_lost",
            "message": f"the job was started {rt.guard.max_attempts} times and its worker "
                       "died each time"}
        return _finish(rt, verified, lost)
    return claim.outcome


def _run_claimed(rt: WorkerRuntime, verified: Verified, policy: TenantPolicy) -> str:
    header = verified.header
    job_id = header.job_id
    try:
        plaintext = verified.decrypt()
    except EnvelopeRejected:
        _reject(rt, job_id, "tampered", header, authenticated=True)
        return "tampered"
    if not (policy.allows_model(header.model) and policy.allows_priority(header.priority)):
        _reject(rt, job_id, "policy", header, authenticated=True)
        return "policy"
    doc = _run_model(rt, verified, plaintext)
    del plaintext
    if isinstance(doc, str):
        _reject(rt, job_id, doc, header, authenticated=True)
        return doc
    return _finish(rt, verified, doc)


def _finish(rt: WorkerRuntime, verified: Verified, doc: dict[str, Any]) -> str:
    """Seal and store the result write-once; the outcome for the log."""
    s = rt.settings
    header = verified.header
    sealed = _seal_result(rt, verified, doc)
    stored = rt.guard.store_result(header.job_id, sealed, result_ttl_s=s.result_ttl_s,
                                   replay_window_ms=_window_ms(rt, header))
    return ("succeeded" if doc["ok"] else "failed") if stored else "duplicate"


# max_retries=None: a retry (another worker runs the job, or memory is short)
# must never turn into a failure that acks the message; expiry bounds it.
@shared_task(name=TASK_NAME, bind=True, ignore_result=True, acks_late=True, max_retries=None)
def infer(self: Task, *args: Any, **kwargs: Any) -> None:
    """Celery entry point. Takes exactly one argument: the base64 envelope.

    Returns nothing: the sealed result is stored by the pipeline, so neither
    Celery's result backend nor Flower ever sees it.
    """
    try:
        rt = get_runtime()
        outcome = process(rt, self, args, kwargs)
        log.info("job %r %s", str(self.request.id)[:64], outcome)
        metrics.job_finished(str(self.request.id), outcome)
    except (Retry, Reject):
        raise
    except Exception as exc:
        # Infrastructure (Redis, the keyring file) or a bug of ours, not the
        # message: hand it back so nothing accepted is lost (Celery would ack a
        # failed task). Give up our claim so the next delivery can take the
        # job; its expiry and the attempt count bound the retries. Log the
        # type only: an exception's text could quote data.
        log.error("job %s: %s; requeueing", self.request.id, type(exc).__name__)
        try:
            get_runtime().guard.release(str(self.request.id))
        except Exception:
            log.debug("claim release failed", exc_info=False)
        time.sleep(INFRA_BACKOFF_S)
        raise Reject(type(exc).__name__, requeue=True) from None


_advertiser: Advertiser | None = None


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    global _advertiser
    settings = Settings.from_env()
    node = getattr(sender, "hostname", None)
    _advertiser = Advertiser(settings, node)
    _advertiser.start()
    log.info("maas worker %s ready; models: %s", _advertiser.node,
             ", ".join(build_registry(settings).refs()) or "(none)")


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    if _advertiser is not None:
        _advertiser.stop()


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # Build the runtime (and its lease thread) in each pool child up front, so
    # the first job does not pay for it and configuration errors show at start.
    # The watchdog installs a signal handler: it must be made in this thread.
    get_runtime().watchdog.ensure_started()


@signals.after_setup_logger.connect
def _quiet_per_task_lines(**_: Any) -> None:
    # Celery logs two INFO lines per task ("Received task", "Task ... succeeded
    # in"); the pipeline logs one with the job's actual outcome (succeeded,
    # failed, rejected: reason, cancelled, ...). One line a job is plenty and
    # measurably cheaper at hundreds of jobs a second.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)
