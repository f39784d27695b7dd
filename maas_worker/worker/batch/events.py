"""Celery task events for jobs run by a batch consumer, so Flower follows them too.

A Celery worker sends ``task-received``, ``task-started`` and
``task-succeeded`` or ``task-failed`` for every task it runs; Flower's task
list is built from them (and from the producer's ``task-sent``). The batch
consumer runs jobs outside Celery's task machinery, so without these its jobs
would sit in Flower as sent and never finish. It sends the same three events
per finished job, with what a Celery worker shows for the ``maas.infer``
task: the arguments as ``<sealed envelope>``, the result as ``None`` (the
sealed result is in Redis, never in an event), or for a job that did not
succeed ``task-failed`` with the same `JobNotSucceeded` words the task
raises (worker/task_state.py) and no traceback; the runtime, and the worker
node's name. They are buffered like
a Celery worker's and published once per batch, after its acknowledgement.

Events are best effort, as in Celery: a failure to publish them is logged
and never touches a job.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from maas_worker.broker.app import make_producer_app
from maas_worker.errors import JobNotSucceeded
from maas_worker.protocol import ARGS_REPR
from maas_worker.settings import Settings

log = logging.getLogger(__name__)


class TaskEvents:
    """Buffers the task events of finished jobs and publishes them in one message."""

    def __init__(
        self, settings: Settings, hostname: str, *, task_name: str, shard: int | None = None
    ) -> None:
        self.hostname = hostname
        self.task_name = task_name
        # On the queue shard of the jobs (its event channels carry its prefix).
        self._app = make_producer_app(settings, shard)
        self._conn: Any = None
        self._dispatcher: Any = None
        self._warned = False

    def _ensure(self) -> Any:
        if self._dispatcher is None:
            self._conn = self._app.connection_for_write()
            self._dispatcher = self._app.events.Dispatcher(
                self._conn, hostname=self.hostname, buffer_group=["task"], buffer_limit=1_000_000
            )  # flushed by `flush`, once per batch
        return self._dispatcher

    def finished(
        self,
        job_id: str,
        *,
        received_at: float,
        runtime_s: float,
        failure: JobNotSucceeded | None = None,
    ) -> None:
        """Record a job the consumer finished: succeeded, or ``failure`` (task_state.py)."""
        try:
            d = self._ensure()
            d.send(
                "task-received",
                uuid=job_id,
                name=self.task_name,
                args=ARGS_REPR,
                kwargs="{}",
                root_id=job_id,
                parent_id=None,
                retries=0,
                eta=None,
                expires=None,
                timestamp=received_at,
            )
            d.send("task-started", uuid=job_id, timestamp=received_at)
            if failure is None:
                d.send(
                    "task-succeeded",
                    uuid=job_id,
                    result="None",
                    runtime=runtime_s,
                    timestamp=time.time(),
                )
            else:
                # What a Celery worker sends for the task's JobNotSucceeded (its
                # repr: outcome and reason words only), without the traceback.
                d.send(
                    "task-failed",
                    uuid=job_id,
                    exception=repr(failure),
                    traceback="",
                    timestamp=time.time(),
                )
        except Exception as exc:
            self._failed(exc)

    def flush(self) -> None:
        """Publish what is buffered (one message for the whole batch)."""
        if self._dispatcher is None:
            return
        try:
            self._dispatcher.flush()
        except Exception as exc:  # events are best effort; the jobs are done
            self._failed(exc)
            self._close()

    def _failed(self, exc: Exception) -> None:
        # Once per process: an outage would otherwise log a line per job.
        if not self._warned:
            log.warning("task events not sent (%s); Flower may miss jobs", type(exc).__name__)
            self._warned = True

    def _close(self) -> None:
        try:
            if self._dispatcher is not None:
                self._dispatcher.close()
            if self._conn is not None:
                self._conn.release()
        except Exception:
            log.debug("closing the event connection failed", exc_info=False)
        self._dispatcher = self._conn = None

    def close(self) -> None:
        """Publish what is left and release the connection."""
        self.flush()
        self._close()
