"""The ``maas.infer`` task: open the sealed job, run the model, seal the result.

The task runs the stages of pipeline.py for one message; their order and invariants are
documented there, once. A rejected message is acknowledged and audited; the worker
carries on with the next message. A job that must wait (busy elsewhere, memory short)
is retried with a delay. An error while handling one job is that job's own: it is
retried a few times, then failed (`pipeline.fault`); only Redis out of reach hands the
message back as it is.

Celery's remote control is read-only on these nodes unless an operator opens it
(control.py): ``revoke`` and friends, which would discard a job silently, are refused
with a pointer to ``maas-worker cancel``, and audited.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import Task, current_app, shared_task, signals
from celery.exceptions import Reject, Retry

from maas_worker.broker import fetch, transport
from maas_worker.broker.app import settings_of
from maas_worker.errors import JobNotSucceeded
from maas_worker.monitoring import metrics
from maas_worker.protocol import TASK_NAME, payload_ref_tenant
from maas_worker.tenancy.keyring import TenantPolicy
from maas_worker.worker.pipeline import (
    UNAVAILABLE,
    Defer,
    Ended,
    Stop,
    check_memory,
    claim,
    fault,
    refuse_unreadable,
    request_bytes,
    request_text,
    run_claimed,
    settle_claim,
    tenant_policy,
    verify_request,
)
from maas_worker.worker.runtime import WorkerRuntime, get_runtime
from maas_worker.worker.task_state import not_succeeded

log = logging.getLogger(__name__)

# Worker processes import this module before their consumer connects: from
# then on what a Redis writer puts in a queue is checked before Celery sees it.
transport.install()

#: Pause before handing a message back when Redis or the keyring is unavailable,
#: so an outage is not a hot loop.
INFRA_BACKOFF_S = 1.0


def process(rt: WorkerRuntime, task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Ended:
    """Run one delivery through the pipeline; returns how it ended (for logs and tests).

    Raises `Retry` for a job that must wait, and one of `UNAVAILABLE` when
    Redis is out of reach or the keyring unreadable (the task hands the
    message back).
    """
    job_id = str(task.request.id or "")
    routed = (task.request.delivery_info or {}).get("routing_key")
    try:
        text = request_text(rt, job_id, args, kwargs)
        ref_tenant = payload_ref_tenant(text)
        fetched = (
            rt.guard.fetch_payload(ref_tenant, job_id, rt.settings.max_envelope_chars)
            if ref_tenant
            else None
        )
        data = request_bytes(rt, job_id, text, fetched)
        verified = verify_request(
            rt,
            job_id,
            data,
            task_name=task.name,
            routed=routed,
            text=text,
            list_tenant=getattr(task.request, fetch.LIST_TENANT_HEADER, None),
        )
    except Stop as stop:
        return stop.ended
    except UNAVAILABLE:
        raise
    except Exception as exc:
        return refuse_unreadable(rt, job_id, exc).ended
    policy: TenantPolicy | None = None
    claimed = False
    try:
        policy = tenant_policy(rt, verified.header)
        check_memory(rt, verified.header)
        settle_claim(rt, verified, policy, claim(rt, verified, policy))
        claimed = True
        return run_claimed(rt, verified, policy)
    except Stop as stop:
        return stop.ended
    except Defer as defer:
        # Not started (or another live worker runs it): back after a delay.
        raise task.retry(countdown=defer.delay_s) from None
    except UNAVAILABLE:
        # No job's fault: infer() hands the message back. Give the claim back
        # now if Redis lets us (else its lease lapses on its own).
        with contextlib.suppress(Exception):
            rt.guard.release(verified.header.tenant, verified.header.job_id)
        raise
    except Exception as exc:
        # This job's own error (a Redis error while counting it propagates:
        # the message is handed back).
        claimed = False
        verdict = fault(rt, verified, policy, exc)
        if isinstance(verdict, Stop):
            return verdict.ended
        raise task.retry(countdown=verdict.delay_s) from None
    finally:
        if claimed and policy is not None:
            rt.quotas.release(verified.header.tenant, verified.header.job_id, policy)


# max_retries=None: a retry (another worker runs the job, memory is short, or
# the job's own error is retried) must never turn into a failure that acks
# the message; expiry and the fault count bound it. JobNotSucceeded is the one
# failure the task raises on purpose: `throws` makes Celery log it at INFO
# (quietened below) without a traceback, and with acks_late Celery acknowledges
# it (task_acks_on_failure_or_timeout, on by default) exactly as a success.
@shared_task(
    name=TASK_NAME,
    bind=True,
    ignore_result=True,
    acks_late=True,
    max_retries=None,
    throws=(JobNotSucceeded,),
)
def infer(self: Task, *args: Any, **kwargs: Any) -> None:
    """Celery entry point. Takes exactly one argument: the base64 envelope.

    Returns nothing: the sealed result is stored by the pipeline, so neither
    Celery's result backend nor Flower ever sees it. Raises `JobNotSucceeded`
    (outcome and reason words only) for a job that did not succeed, so Celery's
    task event, and Flower, say FAILURE rather than SUCCESS (task_state.py);
    ``ignore_result`` keeps that out of the result backend too.
    """
    try:
        rt = get_runtime()
        ended = process(rt, self, args, kwargs)
        log.log(ended.level, "job %r %s", str(self.request.id)[:64], ended.line)
        metrics.job_finished(str(self.request.id), ended.outcome)
    except (Retry, Reject):
        raise
    except Exception as exc:
        # Redis out of reach (or the keyring file unreadable), not the
        # message: hand it back so nothing accepted is lost (Celery would ack
        # a failed task). The pipeline gave up any claim it held. Log the
        # type only: an exception's text could quote data.
        log.error("job %r: %s; requeueing", str(self.request.id)[:64], type(exc).__name__)
        time.sleep(INFRA_BACKOFF_S)
        raise Reject(type(exc).__name__, requeue=True) from None
    failure = not_succeeded(ended.outcome, ended.failure)
    if failure is not None:
        raise failure


# The node's start and stop (remote-control gate, advertisement, batch
# consumers) are Celery bootsteps: worker/node.py. Signals remain where Celery
# has no step: each pool child's start, and the logging setup.
@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # Build the runtime (and its lease thread) in each pool child up front, so
    # the first job does not pay for it and configuration errors show at start.
    # The watchdog installs a signal handler: it must be made in this thread.
    # The settings are the main process's, inherited through the fork.
    get_runtime(settings_of(current_app)).watchdog.ensure_started()


@signals.after_setup_logger.connect
def _quiet_per_task_lines(**_: Any) -> None:
    # Celery logs two INFO lines per task ("Received task", "Task ... succeeded
    # in"); the pipeline logs one with the job's actual outcome (succeeded,
    # failed: timeout, a refusal's reason, cancelled, ...). One line a job is plenty and
    # measurably cheaper at hundreds of jobs a second.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)
