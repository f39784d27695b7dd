"""The ``maas.sample`` task and the per-task hooks behind the busy-time metric.

``maas.sample`` takes no arguments and never sees a job: it samples the host
and this worker's pool (samples.py) and stores the sample. It sends no task
events (``send_events=False``) and returns nothing: a row per tick and per
node would crowd the jobs out of Flower's task list and count in its
Processed and Succeeded columns. Flower shows the node's latest sample on the
worker's page instead, from the node's ``stats`` reply (worker/node.py).

Task hooks (Celery signals: Celery has no bootstep per task):
task_prerun/task_postrun, in the process running the task: busy time. The
node's start and stop (the metrics directory and endpoint, the broadcast
queue, withdrawing the node's sample) are bootsteps: worker/node.py.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from billiard.process import current_process  # type: ignore[import-untyped]
from celery import Task, shared_task, signals

from maas_worker.backend.redis import backend_client
from maas_worker.broker.app import settings_of
from maas_worker.monitoring import metrics
from maas_worker.monitoring.samples import SampleStore, take_sample
from maas_worker.protocol import SAMPLE_TASK, TASK_NAME
from maas_worker.settings import Settings

log = logging.getLogger(__name__)

#: Each process's own sample store (the task runs in pool children).
_stores: dict[int, SampleStore] = {}


def _store(settings: Settings) -> SampleStore:
    pid = os.getpid()  # one Redis client per process, never shared across a fork
    if pid not in _stores:
        _stores.clear()
        _stores[pid] = SampleStore(backend_client(settings), interval_s=settings.sample_interval_s)
    return _stores[pid]


@shared_task(name=SAMPLE_TASK, bind=True, acks_late=False, ignore_result=True, send_events=False)
def sample(self: Task) -> None:
    """Record this node's resource sample in the result backend (samples.py)."""
    settings = settings_of(self.app)
    node = str(self.request.hostname or "")
    taken = take_sample(
        node,
        main_pid=_main_pid(),
        interval_s=settings.sample_interval_s,
        jobs=metrics.local_job_totals(),
    )
    _store(settings).record(taken)


def _main_pid() -> int:
    """The worker's main process: a prefork pool child's parent, else this process."""
    return os.getppid() if current_process().name != "MainProcess" else os.getpid()


@signals.task_prerun.connect
def _on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id and getattr(task, "name", None) == TASK_NAME:
        metrics.task_started(task_id)


@signals.task_postrun.connect
def _on_task_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id and getattr(task, "name", None) == TASK_NAME:
        metrics.task_ended(task_id)
