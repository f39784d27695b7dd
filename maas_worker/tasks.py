"""The ``maas.infer`` task: open the sealed job, run the model, seal the result.

The stages and their order are in pipeline.py (shared with the batch
consumer, consumer.py): size -> version/type -> key lookup -> time window ->
HMAC -> task name/id binding -> memory headroom -> replay claim with cancel
check and quota admission -> decrypt -> tenant policy -> model -> run under
the watchdog -> seal -> store write-once. A rejected message is acknowledged,
audited and marked so its client learns of it; the worker carries on with the
next message. A job that must wait (busy elsewhere, memory short) is retried
with a delay.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, shared_task, signals
from celery.exceptions import Reject, Retry

from . import metrics, supervisor, transport
from .app import TASK_NAME
from .pipeline import (
    Defer,
    Stop,
    check_memory,
    claim,
    needs_payload,
    request_bytes,
    request_text,
    run_claimed,
    settle_claim,
    tenant_policy,
    verify_request,
)
from .runtime import Advertiser, WorkerRuntime, build_registry, get_runtime
from .settings import Settings

log = logging.getLogger(__name__)

# Worker processes import this module before their consumer connects: from
# then on what a Redis writer puts in a queue is checked before Celery sees it.
transport.install()

#: Pause before handing a message back when Redis or the keyring is unavailable,
#: so an outage is not a hot loop.
INFRA_BACKOFF_S = 1.0


def process(rt: WorkerRuntime, task: Task, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> str:
    """Run one delivery through the pipeline; returns the outcome (for logs and tests)."""
    job_id = str(task.request.id or "")
    routed = (task.request.delivery_info or {}).get("routing_key")
    try:
        text = request_text(rt, job_id, args, kwargs)
        fetched = rt.guard.fetch_payload(job_id, rt.settings.max_envelope_chars) \
            if needs_payload(text) else None
        data = request_bytes(rt, job_id, text, fetched)
        verified = verify_request(rt, job_id, data, task_name=task.name, routed=routed)
        check_memory(rt, verified.header)
        policy = tenant_policy(rt, verified.header)
        settle_claim(rt, verified, policy, claim(rt, verified, policy))
    except Stop as stop:
        return stop.outcome
    except Defer as defer:
        # Not started (or another live worker runs it): back after a delay.
        raise task.retry(countdown=defer.delay_s) from None
    header = verified.header
    try:
        return run_claimed(rt, verified, policy)
    finally:
        rt.quotas.release(header.tenant, header.job_id, policy)


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
    # With --batch-consumer, the consumer processes take the job queues: the
    # node is announced (clients and tests wait for that) once they are ready.
    supervisor.start_configured(node)
    _advertiser = Advertiser(settings, node)
    _advertiser.start()
    log.info("maas worker %s ready; models: %s", _advertiser.node,
             ", ".join(build_registry(settings).refs()) or "(none)")


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    # Consumers finish their batch and acknowledge it before the node goes.
    supervisor.stop_running()
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
