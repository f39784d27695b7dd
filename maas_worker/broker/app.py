"""The producer's Celery configuration: what a process that only sends jobs needs.

Queues, exchange, serializers, transport options (socket timeouts, the
visibility sweep), TLS and the claim-check argument. `make_producer_app` is the
app of `Client` and of the batch consumer's task events; the worker's app
(``maas_worker.app``, the composition root) is built on `producer_config`. Nothing
here imports the worker or monitoring code, so a producer loads neither.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from maas_worker.broker import shards
from maas_worker.broker.scheduling import STRATEGY
from maas_worker.protocol import QUEUE_NAMES, Priority, queue_for
from maas_worker.settings import Settings, is_sentinel_url

EXCHANGE = "maas"
#: Producers' ``broker_transport``: kombu's Redis transport with the wake-up ring
#: (transport.py; named, not imported, so kombu loads it only when connecting).
TRANSPORT = "maas_worker.broker.transport:Transport"
#: The same for a ``sentinel://`` broker URL (kombu's Sentinel transport underneath).
SENTINEL_TRANSPORT = "maas_worker.broker.transport:SentinelTransport"


def producer_transport(broker_url: str) -> str:
    """The producers' ``broker_transport`` for ``broker_url``: an explicit transport wins
    over the URL's scheme in kombu, so a ``sentinel://`` URL needs its own."""
    return SENTINEL_TRANSPORT if is_sentinel_url(broker_url) else TRANSPORT


#: A broker command (a publish, a reservation) waiting longer than this is an
#: error, not a hang; longer than kombu's 1 s BRPOP poll.
BROKER_SOCKET_TIMEOUT_S = 10.0
BROKER_CONNECT_TIMEOUT_S = 5.0


def transport_options(settings: Settings, shard: int | None = None) -> dict[str, Any]:
    """Redis transport options derived from the settings, for queue shard ``shard``
    (default: the node's first; shards.shard_transport_options).

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
        **sentinel_transport_options(settings),
        **shards.shard_transport_options(settings, shard),
    }


def sentinel_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Sentinel options for a ``sentinel://`` broker URL (none otherwise): the
    master name, and the sentinels' own password, TLS and timeouts."""
    if not is_sentinel_url(settings.broker_url):
        return {}
    from maas_worker.backend.redis import sentinel_options

    _, sentinel_kwargs, _ = sentinel_options(
        settings.broker_url, tls=settings.redis_tls, ha=settings.redis_ha
    )
    return {"master_name": settings.redis_ha.sentinel_master, "sentinel_kwargs": sentinel_kwargs}


def job_queues() -> list[Any]:
    """The three job queues (kombu ``Queue``), high first, on the direct exchange."""
    return [
        Queue(
            name,
            Exchange(EXCHANGE, type="direct"),  # type: ignore[no-untyped-call]
            routing_key=name,
        )
        for name in QUEUE_NAMES
    ]


def producer_config(settings: Settings, shard: int | None = None) -> dict[str, Any]:
    """The Celery configuration a producer needs (the worker's starts from it), its
    connection on queue shard ``shard`` (default: the node's first)."""
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
        # Flower shows jobs from the moment they are queued: the producer's
        # task-sent event (workers send the rest).
        "task_send_sent_event": True,
        "task_queues": job_queues(),
        "task_default_exchange": EXCHANGE,
        "task_default_queue": queue_for(Priority.NORMAL),
        "task_create_missing_queues": False,
        "broker_transport_options": transport_options(settings, shard),
        "broker_connection_retry_on_startup": True,
        # rediss://: verify the server (kombu alone would silently use CERT_NONE)
        # and present the client certificate; Flower's broker view reads it too.
        "broker_use_ssl": settings.redis_ssl(settings.broker_url) or False,
    }


def make_producer_app(settings: Settings, shard: int | None = None) -> Celery:
    """A Celery app that sends jobs (and task events) and runs none, on queue shard
    ``shard`` (default: the node's first; one app, one broker connection, one shard)."""
    app = Celery("maas_worker", include=[])
    # Producers ring the wake-up list with each publish (transport.py).
    # Workers install the same channel over kombu's own instead (tasks.py):
    # that keeps the redis:// scheme that Celery's banner and Flower's
    # broker view know, and covers redis+socket:// URLs, which name
    # kombu's transport whatever this setting says.
    app.conf.broker_transport = producer_transport(settings.broker_url)
    app.conf.update(producer_config(settings, shard))
    setattr(app, SETTINGS_ATTR, settings)
    return app


#: The attribute of a Celery app holding its `Settings`.
SETTINGS_ATTR = "maas_settings"


def settings_of(app: Celery) -> Settings:
    """The settings ``app`` runs with, read from the environment on first use if it was
    given none (``celery -A maas_worker.app``); worker hooks and tasks take theirs here."""
    settings: Settings | None = getattr(app, SETTINGS_ATTR, None)
    if settings is None:
        settings = Settings.from_env()
        setattr(app, SETTINGS_ATTR, settings)
    return settings
