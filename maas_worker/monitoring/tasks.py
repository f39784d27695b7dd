"""The ``maas.sample`` task and the worker hooks behind monitoring and metrics.

``maas.sample`` takes no arguments and never sees a job: it samples the host
and this worker's pool (monitoring.py), stores the sample, and returns a
short readable summary, which is what Flower shows as its result.

Worker hooks (Celery signals):
- worker_init (main process, before the pool forks): the private metrics
  directory (metrics.py), and the broadcast queue added to whatever ``-Q``
  selected, so ``celery -A maas_worker.app worker -Q ...`` samples too;
- worker_ready: the worker's ``/metrics`` endpoint (``MAAS_METRICS_PORT``);
- task_prerun/task_postrun (the process running the task): busy time;
- worker_shutdown: the node's sample is withdrawn at once and the metrics
  directory removed (a crashed node's sample expires on its own).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import redis
from celery import Task, shared_task, signals

from maas_worker.app import TASK_NAME, settings_of
from maas_worker.monitoring import metrics
from maas_worker.monitoring.autoscale import pool_state
from maas_worker.monitoring.samples import (
    SAMPLE_TASK,
    SampleStore,
    monitor_queue,
    summarize,
    take_sample,
)
from maas_worker.settings import Settings
from maas_worker.worker.runtime import backend_client

log = logging.getLogger(__name__)

#: Set in the worker's main process before the pool forks; children inherit them.
_main_pid: int | None = None
_node: str | None = None
_server: Any = None
_stores: dict[int, SampleStore] = {}


def _store(settings: Settings) -> SampleStore:
    pid = os.getpid()  # one Redis client per process, never shared across a fork
    if pid not in _stores:
        _stores.clear()
        _stores[pid] = SampleStore(backend_client(settings), interval_s=settings.sample_interval_s)
    return _stores[pid]


@shared_task(name=SAMPLE_TASK, bind=True, acks_late=False, ignore_result=True)
def sample(self: Task) -> dict[str, str]:
    """Record this node's resource sample; the readable summary is the result (Flower)."""
    settings = settings_of(self.app)
    node = _node or str(self.request.hostname or "")
    taken = take_sample(node, main_pid=_main_pid or os.getpid(),
                        interval_s=settings.sample_interval_s, jobs=metrics.local_job_totals())
    return summarize(_store(settings).record(taken))


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _main_pid, _node
    _main_pid = os.getpid()
    _node = getattr(sender, "hostname", None)
    metrics.init_multiprocess_dir()
    if sender is not None:
        sender.app.amqp.queues.select_add(monitor_queue())


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    global _server
    settings = settings_of(sender.app)
    path = metrics.multiprocess_dir()
    if path is not None and _node:
        _server = metrics.serve(metrics.WorkerCollector(path, _node, pool_state),
                                port=settings.metrics_port, address=settings.metrics_address)


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    if _server is not None:
        _server.shutdown()
    if _node:
        with contextlib.suppress(redis.RedisError):
            _store(settings_of(sender.app)).forget(_node)
    metrics.remove_multiprocess_dir()


@signals.task_prerun.connect
def _on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id and getattr(task, "name", None) == TASK_NAME:
        metrics.task_started(task_id)


@signals.task_postrun.connect
def _on_task_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id and getattr(task, "name", None) == TASK_NAME:
        metrics.task_ended(task_id)
