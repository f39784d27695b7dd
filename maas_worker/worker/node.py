"""The worker node: what a Celery worker's main process runs besides its consumer and pool.

One `Node` per worker main process owns the node's objects and their order:

- before the consumer and the pool exist (`Node.prepare`): the remote-control
  gate (control.py), which the consumer's pidbox node is built with; the
  private metrics directory (metrics.py), which the pool's children inherit;
  the broadcast queue of resource samples, added to whatever ``-Q`` selected
  (so ``celery -A maas_worker.app worker -Q ...`` samples too);
- once the node can serve (`Node.serve`): the batch-consumer processes if
  ``maas-worker worker`` asked for them (its default mode; supervisor.py), then the model
  advertisement (`runtime.Advertiser`: the node is announced, which is what
  clients and tests wait for), then the ``/metrics`` endpoint, whose pool
  gauges read the worker's autoscaler;
- whenever the node answers ``stats`` (Flower's worker page and
  ``/api/workers``, ``celery inspect stats``): its latest resource sample
  (`Node.stats`, read from the result backend; both worker modes);
- at a warm shutdown, after the pool has drained (`Node.close`): the batch
  consumers finish their batch and stop, the node is withdrawn, the endpoint
  closes, the node's resource sample is withdrawn and the metrics directory
  removed. A cold shutdown leaves all that to expire on its own, as a crash
  does.

Two Celery bootsteps drive it (app.py registers them on the worker app):
`NodeStep` in the worker's blueprint, `ServeStep` in its consumer's.

Celery signals remain only where Celery has no step: the pool-child init
(``worker_process_init``, in each prefork child: worker/tasks.py), the
logging setup (``after_setup_logger``: worker/tasks.py) and the per-task
hooks (``task_prerun``/``task_postrun``: monitoring/tasks.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps

from maas_worker.backend import audit
from maas_worker.backend.redis import backend_client, check_credentials
from maas_worker.broker import transport
from maas_worker.broker.app import settings_of
from maas_worker.errors import ConfigError
from maas_worker.monitoring import autoscale, metrics
from maas_worker.monitoring.samples import (
    STATS_KEY,
    STATS_ROW_PREFIX,
    SampleStore,
    monitor_queue,
    stats_fields,
)
from maas_worker.settings import Settings
from maas_worker.worker import control
from maas_worker.worker.batch import supervisor
from maas_worker.worker.runtime import Advertiser, build_registry

log = logging.getLogger(__name__)

#: The row of a node's ``stats`` reply that says how it runs jobs (`Node.mode_text`).
MODE_KEY = "worker mode"


class Node:
    """One worker node's objects, in its main process (see the module docstring).

    ``batch`` is `supervisor.ConsumerPool`'s keywords when the node runs batch
    consumers, else None.
    """

    def __init__(
        self, app: Any, name: str, settings: Settings, *, batch: dict[str, Any] | None = None
    ) -> None:
        self.app = app
        self.name = name
        self.settings = settings
        self.batch = batch
        self.metrics_dir: Path | None = None
        self.autoscaler: Any = None
        self.consumers: supervisor.ConsumerPool | None = None
        self.advertiser: Advertiser | None = None
        self.metrics_server: Any = None
        self.samples: SampleStore | None = None
        self._serving = False
        self._abandoned = False

    def prepare(self) -> None:
        """In the worker's main process, before its consumer is built and its pool forks."""
        # The channel's limits and its audit records of refused entries: this worker's settings.
        # Refusals the main process audits (the entry check, the control gate) are
        # counted too: they never become jobs, so maas_jobs_total never sees them.
        transport.install(self.settings, on_record=metrics.refused)
        # From the first command on, only what MAAS_REMOTE_CONTROL allows runs.
        control.configure(
            self.app,
            mode=self.settings.remote_control,
            queues=[q.name for q in self.app.conf.task_queues or ()],
        )
        try:
            self.metrics_dir = metrics.init_multiprocess_dir()
            metrics.declare_series()
        except OSError as exc:  # metrics are never a reason for a worker not to run
            log.warning(
                "no metrics directory (%s); continuing without metrics",
                exc.strerror or type(exc).__name__,
            )
        self.app.amqp.queues.select_add(monitor_queue())

    def serve(self, autoscaler: Any = None) -> None:
        """The node can serve: open ``/metrics``, start its consumers, announce it. Once."""
        if self._serving:
            return
        self._serving = True
        self.autoscaler = autoscaler
        # /metrics first: a node announced ready answers its scrape (a test read
        # the ready line, scraped, and found nothing listening yet).
        try:
            if self.metrics_dir is not None and self.name:
                self.metrics_server = metrics.serve(
                    metrics.WorkerCollector(self.metrics_dir, self.name, self.pool_state),
                    port=self.settings.metrics_port,
                    address=self.settings.metrics_address,
                )
        except Exception:
            log.exception("could not start the metrics endpoint")
        try:
            # In the batch consumer mode the consumer processes take the job
            # queues: the node is announced once they are ready.
            self.advertiser = Advertiser(self.settings, self.name)
            # Fair share: the tenants' weights are in Redis before any take reads them.
            self.advertiser.share(reannounce=True)
            if self.batch is not None:
                self.consumers = supervisor.ConsumerPool(
                    self.settings, node=self.name or "maas", **self.batch
                )
                self.consumers.start()
            self.advertiser.start()
            # The mode in the line operators and tests read, since it is no
            # longer visible on the command line.
            log.info(
                "maas worker %s ready (%s); models: %s",
                self.advertiser.node,
                self.mode_text(),
                ", ".join(build_registry(self.settings).refs()) or "(none)",
            )
            if self.settings.redis_ha.sharded:
                from maas_worker.broker import shards

                log.info(
                    "maas worker %s consumes queue shard(s) %s of %d",
                    self.advertiser.node,
                    ",".join(map(str, shards.consumed(self.settings))),
                    self.settings.redis_ha.queue_shards,
                )
        except Exception:
            log.exception("could not start the node's consumers or advertisement")

    def mode_text(self) -> str:
        """How this node runs jobs, in words (its ready line and ``stats``)."""
        if self.batch is not None:
            return f"batch consumer, {self.batch['processes']} process(es)"
        return "Celery tasks"

    def stats(self) -> dict[str, Any]:
        """What the node adds to Celery's ``stats`` reply: its mode and latest resource sample.

        Read from the result backend, where the node's sample task stores it
        (in a pool child, or in this process in the batch consumer mode):
        one GET per ``stats`` command, which Flower sends when a worker's
        page is opened or its list refreshed. A reply without the sample
        beats no reply: a Redis error is reported in the reply, not raised.
        """
        interval_s = self.settings.sample_interval_s
        mode = {MODE_KEY: self.mode_text()}
        try:
            if self.samples is None:
                self.samples = SampleStore(backend_client(self.settings), interval_s=interval_s)
            sample = self.samples.get(self.name)
        except redis.RedisError as exc:
            return {
                **mode,
                f"{STATS_ROW_PREFIX}taken": "unknown: the result backend did not answer "
                f"({type(exc).__name__})",
                STATS_KEY: None,
            }
        return {**mode, **stats_fields(sample, now=time.time(), interval_s=interval_s)}

    def pool_state(self) -> dict[str, int] | None:
        """Current, desired, min and max pool size (None without our autoscaler)."""
        return autoscale.pool_state(self.autoscaler)

    def abandon(self) -> None:
        """Cold shutdown: `close` does nothing; the node's entries expire on their own."""
        self._abandoned = True

    def close(self) -> None:
        """Warm shutdown, once the pool has drained: stop and withdraw what `serve` started."""
        if self._abandoned:
            return
        try:
            # Consumers finish their batch and acknowledge it before the node goes.
            if self.consumers is not None:
                self.consumers.stop()
            if self.advertiser is not None:
                self.advertiser.stop()
        except Exception:
            log.exception("could not stop the node's consumers or advertisement")
        try:
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            if self.name:
                with contextlib.suppress(redis.RedisError):
                    SampleStore(
                        backend_client(self.settings), interval_s=self.settings.sample_interval_s
                    ).forget(self.name)
            if self.metrics_dir is not None:
                metrics.remove_multiprocess_dir(self.metrics_dir)
        except Exception:
            log.exception("could not withdraw the node's sample or metrics")


def refuse_bad_credentials(settings: Settings, *, logfile: str | None = None) -> None:
    """Exit 1 with one line naming the cause if Redis refuses the worker's credentials.

    Celery retries a broker connection that fails a hundred times ("Trying
    again in 2.00 seconds... (1/100)"), but a wrong password, an unknown user
    or a user without the worker's rights (WRONGPASS, NOAUTH, NOPERM) never
    gets better by retrying. One PING per URL at start (the broker's and the
    result backend's), none per job; a server that is not reachable yet is
    left to Celery's retries. The worker app runs it as the worker starts
    (app.py, ``celeryd_init``), so that ``celery -A maas_worker.app worker``
    and ``maas-worker worker`` both exit. The line is Redis's refusal, never
    the URL or password; it goes to stderr and, with ``--logfile`` (Celery's
    logging is not set up yet), is appended to the log file too.
    """
    for url in dict.fromkeys((settings.broker_url, settings.result_backend)):
        try:
            check_credentials(url, tls=settings.redis_tls, ha=settings.redis_ha, who="the worker")
        except ConfigError as exc:
            line = f"maas-worker: error: {exc}"
            if logfile:
                with contextlib.suppress(OSError), open(logfile, "a") as f:
                    f.write(line + "\n")
            print(line, file=sys.stderr, flush=True)
            raise SystemExit(1) from None


class NodeStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Worker step: makes the worker's `Node` and prepares it before the consumer exists.

    Celery creates every step before it starts any, and the consumer step
    (``last``) after all others: `create` runs before the consumer builds its
    pidbox node and before the pool forks. The node is ``w.maas_node``, where
    `ServeStep` finds it (as Celery's own steps share ``w.pool``, ``w.autoscaler``).
    """

    label = "maas node"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        w.maas_node = None
        super().__init__(w, **kwargs)

    def create(self, w: Any) -> Node:
        """The node of worker ``w``, prepared."""
        # Before the pool forks: every process of the node audits under its name.
        audit.name_worker(w.hostname)
        node = w.maas_node = Node(
            w.app, w.hostname, settings_of(w.app), batch=supervisor.requested(w.app)
        )
        node.prepare()
        return node

    def start(self, w: Any) -> None:
        """Nothing yet: `ServeStep` starts the node once the consumer serves."""

    def stop(self, w: Any) -> None:
        """Nothing yet: `ServeStep.shutdown` closes the node once the pool has drained."""

    def terminate(self, w: Any) -> None:
        """Cold shutdown: leave the node's entries to expire, as before (`Node.abandon`)."""
        if self.obj is not None:
            self.obj.abandon()

    def info(self, w: Any) -> dict[str, Any]:
        """The node's part of the worker's ``stats`` reply (`Node.stats`)."""
        node: Node | None = getattr(w, "maas_node", None)
        return node.stats() if node is not None else {}


class ServeStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Consumer step: serves the worker's `Node` once the consumer does; closes it at the end.

    Celery stops and starts a consumer's steps again at each broker
    reconnection: the node is served at the first start and stays announced
    through reconnections; it is closed at the consumer's ``shutdown``, which
    Celery calls once, after the worker's other steps (the pool too) stopped.
    """

    label = "maas node ready"
    # Started after the steps that make the node serve: the task consumer,
    # remote control, heartbeats and gossip (all that Celery starts before its
    # event loop, where it would send ``worker_ready``).
    requires = (
        "celery.worker.consumer.tasks:Tasks",
        "celery.worker.consumer.control:Control",
        "celery.worker.consumer.heart:Heart",
        "celery.worker.consumer.gossip:Gossip",
    )

    def start(self, c: Any) -> None:
        """Serve the node (the first time only)."""
        node: Node | None = getattr(c.controller, "maas_node", None)
        if node is not None:
            node.serve(autoscaler=getattr(c.controller, "autoscaler", None))

    def stop(self, c: Any) -> None:
        """A reconnection: the node stays announced."""

    def shutdown(self, c: Any) -> None:
        """The worker stops: close the node."""
        node: Node | None = getattr(c.controller, "maas_node", None)
        if node is not None:
            node.close()
