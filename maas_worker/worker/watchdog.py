"""Stop a running job: soft time limit, hard time limit, cancellation.

In the prefork and solo pools one job runs at a time per process, in its
main thread. The watchdog interrupts it there:

* **soft limit / cancel**: ``SIGALRM`` is delivered to the main thread (by the
  interval timer, or by the watchdog thread for a cancel); the handler raises
  `JobInterrupted`, which the task turns into a failed result (``timeout`` or
  ``cancelled``). It is a `BaseException`, so model code catching `Exception`
  cannot swallow it. A blocking system call (``sleep``) is interrupted at once;
  code inside a C extension is interrupted when it returns to Python.
* **hard limit**: if the job is still running at the hard deadline (or a
  grace period after a cancel), the watchdog thread stores the failed result
  itself and ends the process (``os._exit``). Celery replaces the pool child;
  the message comes back (``task_reject_on_worker_lost``) and is recognised as
  finished. Nothing but the process can stop a runaway C call.

In the threads pool (used for dynamic batching, `batching.py`) jobs run in
worker threads, which signals cannot reach: there the soft limit is enforced
by the caller's own wait (`batching.DynamicBatcher`), a cancel is honoured only
before the job starts, and the hard limit still ends the process.

Celery's own time limits come from message headers that whoever can write
Redis could change; these come from the worker's settings and the model.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger(__name__)

#: Seconds a cancelled job gets to stop before its process is ended.
CANCEL_GRACE_S = 5.0
#: How often the watchdog thread looks at the running jobs (and for a cancel).
TICK_S = 0.25
#: How often a cancel marker is looked up in Redis for a running job.
CANCEL_POLL_S = 1.0
EXIT_CODE = 70  # EX_SOFTWARE


class JobInterrupted(BaseException):
    """Raised in the job's thread to stop it; ``reason`` is ``timeout`` or ``cancelled``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Running:
    job_id: str
    thread: int
    interruptible: bool
    soft_deadline: float
    hard_deadline: float
    is_cancelled: Callable[[], bool]
    on_hard: Callable[[str], None]
    cancel_seen_at: float | None = None
    next_cancel_poll: float = 0.0
    pending: str | None = None


class Watchdog:
    """One per worker process. `running` wraps the execution of one job."""

    def __init__(self) -> None:
        self._main_ident = threading.main_thread().ident
        self._jobs: dict[int, _Running] = {}
        self._lock = threading.Lock()
        # Signals reach the main thread only; created elsewhere, we cannot
        # interrupt a job, only end the process at its hard limit.
        self.interruptible = threading.current_thread() is threading.main_thread()
        if self.interruptible:
            signal.signal(signal.SIGALRM, self._on_alarm)
        self._thread = threading.Thread(target=self._loop, name="maas-watchdog", daemon=True)
        self._thread.start()

    def ensure_started(self) -> None:
        """No-op: construction already started it (kept explicit for readers)."""

    def _on_alarm(self, _signum: int, _frame: FrameType | None) -> None:
        job = self._jobs.get(threading.get_ident())
        if job is None:
            return  # the job already ended: nothing to interrupt
        raise JobInterrupted(job.pending or "timeout")

    @contextmanager
    def running(
        self,
        job_id: str,
        *,
        soft_limit_s: float,
        hard_limit_s: float,
        is_cancelled: Callable[[], bool],
        on_hard: Callable[[str], None],
    ) -> Iterator[None]:
        """Run the body as job ``job_id``; raises `JobInterrupted` to stop it."""
        now = time.monotonic()
        ident = threading.get_ident()
        interruptible = self.interruptible and ident == self._main_ident
        job = _Running(
            job_id,
            ident,
            interruptible,
            now + soft_limit_s,
            now + max(hard_limit_s, soft_limit_s),
            is_cancelled,
            on_hard,
        )
        with self._lock:
            self._jobs[ident] = job
        if interruptible:
            signal.setitimer(signal.ITIMER_REAL, max(soft_limit_s, 0.001))
        try:
            yield
        finally:
            if interruptible:
                signal.setitimer(signal.ITIMER_REAL, 0)
            with self._lock:
                self._jobs.pop(ident, None)

    def _loop(self) -> None:
        while True:
            time.sleep(TICK_S)
            try:
                with self._lock:
                    jobs = list(self._jobs.values())
                for job in jobs:
                    self._tick(job)
            except Exception:
                log.exception("watchdog tick failed")

    def _tick(self, job: _Running) -> None:
        now = time.monotonic()
        if job.interruptible and job.cancel_seen_at is None and now >= job.next_cancel_poll:
            job.next_cancel_poll = now + CANCEL_POLL_S
            if job.is_cancelled():
                job.cancel_seen_at = now
                job.pending = "cancelled"
                log.info("job %s cancelled; interrupting it", job.job_id)
                signal.pthread_kill(job.thread, signal.SIGALRM)
        if job.cancel_seen_at is not None and now >= job.cancel_seen_at + CANCEL_GRACE_S:
            self._end_process(job, "cancelled")
        elif now >= job.hard_deadline:
            self._end_process(job, "timeout")

    def _end_process(self, job: _Running, reason: str) -> None:
        with self._lock:
            if self._jobs.get(job.thread) is not job:
                return  # it finished in the meantime
        log.error("job %s did not stop (%s); ending this worker process", job.job_id, reason)
        try:
            job.on_hard(reason)
        finally:
            os._exit(EXIT_CODE)
