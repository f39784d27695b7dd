"""The Celery application: ``celery -A maas_worker.app worker`` works as well as the CLI.

An app holds one `Settings` (`settings_of`): the ones it was made or
`configure`d with, else read from the environment the first time Celery reads
its configuration, so importing this module reads no environment.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from maas_worker.broker.scheduling import STRATEGY
from maas_worker.monitoring.samples import celery_options as monitoring_options
from maas_worker.monitoring.samples import monitor_queue
from maas_worker.settings import PRIORITIES, Settings, queue_for
from maas_worker.tenancy.keyring import TENANT_RE

TASK_NAME = "maas.infer"
#: What a job's argument shows as (Celery's ``argsrepr``: Flower, events, logs).
ARGS_REPR = "('<sealed envelope>',)"
#: A task argument ``ref:payload:<tenant>`` says "the sealed request waits at
#: the tenant's payload key of this job" (a large request: claim check).
PAYLOAD_REF_PREFIX = "ref:payload:"
#: Queues in the order a worker consumes them: high first, low last.
QUEUE_NAMES: tuple[str, ...] = tuple(queue_for(p) for p in PRIORITIES)
EXCHANGE = "maas"
#: Producers' ``broker_transport``: kombu's Redis transport with the wake-up ring
#: (transport.py; named, not imported, so kombu loads it only when connecting).
TRANSPORT = "maas_worker.broker.transport:Transport"
#: Modules holding tasks and worker hooks, imported by workers only.
WORKER_MODULES = ["maas_worker.worker.tasks", "maas_worker.monitoring.tasks"]


#: A broker command (a publish, a reservation) waiting longer than this is an
#: error, not a hang; longer than kombu's 1 s BRPOP poll.
BROKER_SOCKET_TIMEOUT_S = 10.0
BROKER_CONNECT_TIMEOUT_S = 5.0


def payload_ref(tenant: str) -> str:
    """The task argument of a claim-checked request of ``tenant``."""
    return PAYLOAD_REF_PREFIX + tenant


def payload_ref_tenant(arg: str) -> str | None:
    """The tenant named by a claim-check argument; None if ``arg`` is not one.

    Unverified (whoever wrote the queue entry chose it): it only says where to
    look, and the envelope found there must be that tenant's (pipeline.py).
    An argument that starts like a reference but names no valid tenant gives
    ``""``.
    """
    if not arg.startswith(PAYLOAD_REF_PREFIX):
        return None
    tenant = arg[len(PAYLOAD_REF_PREFIX):]
    return tenant if TENANT_RE.fullmatch(tenant) else ""


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
        # Priority order with a reserved share for normal and low (scheduling.py).
        "queue_order_strategy": STRATEGY,
        "unacked_restore_interval": max(1, min(10, vt // 4)),
        "unacked_restore_throttle": 1,
        # The sweep holds a Redis lock while it puts messages back. If Redis
        # stops answering mid-sweep, the lock cannot be released and stays
        # until it expires: kombu's 300 s then blocked every sweep, leaving a
        # lost take's reserved messages stuck that long (the reliability
        # suite's frozen-Redis outage saw it in CI). A sweep pass takes
        # milliseconds; if one ever outlasts this, a message is put back
        # twice and its copy refused as replayed, never lost.
        "unacked_mutex_expire": max(10, vt // 10),
        # kombu waits for ever by default: a Redis that stops answering
        # without closing the connection (frozen, failover, partition) hung
        # every submit and left workers blocked instead of reconnecting.
        "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
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
            for name in QUEUE_NAMES] + [monitor_queue()],
        "task_default_exchange": EXCHANGE,
        "task_default_queue": queue_for("normal"),
        "task_create_missing_queues": False,
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        # rediss://: verify the server (kombu alone would silently use CERT_NONE)
        # and present the client certificate; Flower's broker view reads it too.
        "broker_use_ssl": settings.redis_ssl(settings.broker_url) or False,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "task_default_rate_limit": None,
        # Task events for Flower, the resource-sample schedule, the autoscaler.
        **monitoring_options(settings),
        # Per-job limits are the watchdog's (watchdog.py, from the worker's own
        # settings); Celery's hard limit is only a backstop behind them.
        "task_time_limit": max([settings.hard_time_limit_s,
                                *(h for _, h in settings.time_limits.values())]) + 60,
        # Replace a pool child whose resident memory grew past the limit (KiB).
        "worker_max_memory_per_child": settings.max_memory_per_child_mb * 1024 or None,
    }


def make_app(settings: Settings | None = None, *, include_tasks: bool = True) -> Celery:
    """A configured Celery app; producers pass ``include_tasks=False``."""
    app = Celery("maas_worker", include=WORKER_MODULES if include_tasks else [])
    if not include_tasks:
        # Producers ring the wake-up list with each publish (transport.py).
        # Workers install the same channel over kombu's own instead (tasks.py):
        # that keeps the redis:// scheme that Celery's banner and Flower's
        # broker view know, and covers redis+socket:// URLs, which name
        # kombu's transport whatever this setting says.
        app.conf.broker_transport = TRANSPORT
    if settings is None:
        app.add_defaults(lambda: celery_config(settings_of(app)))
    else:
        configure(app, settings)
    return app


#: The attribute of a Celery app holding its `Settings`.
_SETTINGS_ATTR = "maas_settings"


def configure(app: Celery, settings: Settings) -> None:
    """Configure ``app`` from ``settings``, which `settings_of` then returns (its hooks' too)."""
    setattr(app, _SETTINGS_ATTR, settings)
    app.conf.update(celery_config(settings))


def settings_of(app: Celery) -> Settings:
    """The settings ``app`` runs with, read from the environment on first use if it was
    given none (``celery -A maas_worker.app``); worker hooks and tasks take theirs here."""
    settings: Settings | None = getattr(app, _SETTINGS_ATTR, None)
    if settings is None:
        settings = Settings.from_env()
        setattr(app, _SETTINGS_ATTR, settings)
    return settings


app = make_app()
