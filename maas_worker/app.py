"""The Celery application: ``celery -A maas_worker.app worker`` works as well as the CLI.

Configuration is computed lazily from `Settings.from_env` the first time
Celery reads it, so importing this module reads no environment.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from .settings import PRIORITIES, Settings, queue_for

TASK_NAME = "maas.infer"
#: Queues in the order a worker consumes them: high first, low last.
QUEUE_NAMES: tuple[str, ...] = tuple(queue_for(p) for p in PRIORITIES)
EXCHANGE = "maas"


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options derived from the settings.

    The sweep that puts a dead worker's unacked messages back runs every
    ``unacked_restore_interval * unacked_restore_throttle`` seconds (about
    100 s by default), so the visibility timeout alone would not bound
    recovery: the sweep is scaled to it.
    """
    vt = settings.visibility_timeout_s
    return {
        "visibility_timeout": vt,
        "queue_order_strategy": "priority",
        "unacked_restore_interval": max(1, min(10, vt // 4)),
        "unacked_restore_throttle": 1,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The complete Celery configuration for producers and workers."""
    return {
        "broker_url": settings.broker_url,
        # Results never go through Celery's backend: the task stores its sealed
        # result write-once itself (guard.JobGuard.store_result).
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        # A child killed mid-job hands its message back instead of acking it as
        # failed; the job lease decides whether it runs again.
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # The job claim already marks a job running; STARTED would cost a GET,
        # a SET and a PUBLISH per job.
        "task_track_started": False,
        "task_queues": [
            Queue(name, Exchange(EXCHANGE, type="direct"),  # type: ignore[no-untyped-call]
                  routing_key=name)
            for name in QUEUE_NAMES],
        "task_default_exchange": EXCHANGE,
        "task_default_queue": queue_for("normal"),
        "task_create_missing_queues": False,
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "task_default_rate_limit": None,
    }


def make_app(settings: Settings | None = None, *, include_tasks: bool = True) -> Celery:
    """A configured Celery app; producers pass ``include_tasks=False``."""
    app = Celery("maas_worker", include=["maas_worker.tasks"] if include_tasks else [])
    if settings is None:
        app.add_defaults(lambda: celery_config(Settings.from_env()))
    else:
        app.conf.update(celery_config(settings))
    return app


app = make_app()
