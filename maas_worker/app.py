"""The worker's Celery application: ``celery -A maas_worker.app worker`` works as well as the CLI.

The composition root of a worker node: the producer's configuration
(broker/app.py) plus the worker's limits, the monitoring options (events, the
sample schedule, the autoscaler) and the task modules it includes.
An app holds one `Settings` (`settings_of`): the ones it was made or
`configure`d with, else read from the environment the first time Celery reads
its configuration, so importing this module reads no environment.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from maas_worker.broker.app import (
    SETTINGS_ATTR,
    TRANSPORT,
    producer_config,
    producer_transport,
    settings_of,
)
from maas_worker.monitoring.samples import celery_options as monitoring_options
from maas_worker.monitoring.samples import monitor_queue
from maas_worker.settings import Settings

#: Modules holding tasks and worker hooks, imported by workers only.
WORKER_MODULES = ["maas_worker.worker.tasks", "maas_worker.monitoring.tasks"]
#: The worker node's bootsteps (worker/node.py), by blueprint; named, not imported,
#: so producers load none of the worker's code.
WORKER_STEPS = {
    "worker": "maas_worker.worker.node:NodeStep",
    "consumer": "maas_worker.worker.node:ServeStep",
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The complete Celery configuration of a worker node (and beat, Flower, the CLI)."""
    config = producer_config(settings)
    config.update(
        {
            "task_acks_late": True,
            # A child killed mid-job hands its message back instead of acking it as
            # failed; the job lease decides whether it runs again.
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            # Reconnect for as long as the broker is away (Celery gives up after 100
            # attempts, a few minutes): a primary demoted behind a fixed address, or
            # a failover still electing, is an outage to wait out, never a stopped
            # worker (issue #17).
            "broker_connection_max_retries": None,
            # The job claim already marks a job running; STARTED would cost a GET,
            # a SET and a PUBLISH per job.
            "task_track_started": False,
            "task_queues": [*config["task_queues"], monitor_queue()],
            "worker_hijack_root_logger": True,
            "worker_redirect_stdouts": False,
            "task_default_rate_limit": None,
            # Task events for Flower, the resource-sample schedule, the autoscaler.
            **monitoring_options(settings),
            # Per-job limits are the watchdog's (watchdog.py, from the worker's own
            # settings); Celery's hard limit is only a backstop behind them.
            "task_time_limit": max(
                [settings.hard_time_limit_s, *(h for _, h in settings.time_limits.values())]
            )
            + 60,
            # Replace a pool child whose resident memory grew past the limit (KiB).
            "worker_max_memory_per_child": settings.max_memory_per_child_mb * 1024 or None,
        }
    )
    return config


def make_app(settings: Settings | None = None, *, include_tasks: bool = True) -> Celery:
    """A configured worker app; ``include_tasks=False`` gives it the producers' transport.

    A process that only sends jobs wants `maas_worker.broker.app.make_producer_app`.
    """
    app = Celery("maas_worker", include=WORKER_MODULES if include_tasks else [])
    if include_tasks:
        for blueprint, step in WORKER_STEPS.items():
            app.steps[blueprint].add(step)
    if not include_tasks:
        # Producers ring the wake-up list with each publish (broker/app.py).
        app.conf.broker_transport = (
            producer_transport(settings.broker_url) if settings is not None else TRANSPORT
        )
    if settings is None:
        app.add_defaults(lambda: celery_config(settings_of(app)))
    else:
        configure(app, settings)
    return app


def configure(app: Celery, settings: Settings) -> None:
    """Configure ``app`` from ``settings``, which `settings_of` then returns (its hooks' too)."""
    setattr(app, SETTINGS_ATTR, settings)
    app.conf.update(celery_config(settings))


app = make_app()


def _refuse_bad_credentials(instance: Any = None, options: Any = None, **_: Any) -> None:
    """A worker of a maas app whose credentials Redis refuses exits 1 with the cause.

    ``celeryd_init`` is the first thing a Celery worker sends, before its
    banner, its logging and its connection retries: the one place both
    ``celery -A maas_worker.app worker`` and ``maas-worker worker`` pass.
    """
    app = getattr(instance, "app", None)
    if app is None or app.main != "maas_worker":
        return  # another app's worker in this process
    from maas_worker.worker.node import refuse_bad_credentials

    refuse_bad_credentials(settings_of(app), logfile=(options or {}).get("logfile"))


signals.celeryd_init.connect(_refuse_bad_credentials)
