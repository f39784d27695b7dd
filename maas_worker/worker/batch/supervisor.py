"""``maas-worker worker --batch-consumer``: batch consumer processes under a Celery worker.

The Celery worker keeps what makes it a node of the fleet: remote control
(``ping``, Flower), the broadcast queue beat's resource samples arrive on,
task events, the metrics endpoint and the model advertisement. It does not
consume the job queues: once it is ready it starts ``--concurrency``
consumer processes (`consumer.BatchConsumer`, one each, in its main thread so
the watchdog can interrupt a job at its soft limit) and waits until each has
built its runtime; it restarts one that dies (a hard time limit ends its
process, like a pool child) and at a warm shutdown asks each to finish its
batch, acknowledge it and stop (SIGTERM), waiting for them. The worker's node
(worker/node.py) starts and stops the `ConsumerPool`.

The processes are the Celery worker's children: resource samples count them
as its pool, and their job metrics land in its multiprocess directory.

kombu's visibility sweep runs only in a Celery consumer that reads job queues,
which this worker does not: a `Sweeper` thread runs kombu's own sweep
(``restore_visible``, under kombu's lock) at the interval the Celery workers
use, so messages reserved by a consumer that died come back after
``MAAS_VISIBILITY_TIMEOUT_S`` even where every node is a batch consumer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from maas_worker.children import ends_with_parent
from maas_worker.settings import Settings

log = logging.getLogger(__name__)

#: How long a consumer process may take to build its runtime.
READY_TIMEOUT_S = 60.0
#: How long warm shutdown waits for a consumer to finish its batch.
STOP_TIMEOUT_S = 60.0
#: Pause before restarting a consumer that died, so a crash loop is not a hot loop.
RESTART_BACKOFF_S = 1.0
WATCH_INTERVAL_S = 0.5


class ConsumerPool:
    """``processes`` batch consumer processes, watched and restarted.

    Process i consumes queue shard ``shards[i % len(shards)]`` (default: the
    shards the node consumes, shards.consumed): every shard needs one.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        processes: int,
        node: str,
        loglevel: str = "INFO",
        shards: list[int] | None = None,
    ) -> None:
        from maas_worker.broker import shards as shard_rules
        from maas_worker.errors import ConfigError

        self.settings = settings
        self.shards = shards if shards is not None else shard_rules.consumed(settings)
        if processes < len(self.shards):
            raise ConfigError(
                f"{processes} batch consumer process(es) cannot consume {len(self.shards)} "
                "queue shards: give --concurrency at least the number of shards"
            )
        self.processes = processes
        self.node = node
        self.loglevel = loglevel
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * processes
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="maas-consumers", daemon=True)
        self._sweepers = [Sweeper(settings, k) for k in self.shards]

    def start(self) -> None:
        """Start every consumer and wait until each is ready; then watch them."""
        # All at once: each takes seconds to import and load its models, and
        # the node is announced only when the last one is ready (its first
        # could otherwise serve jobs for seconds from a node no one lists).
        launched = [self._launch(i) for i in range(self.processes)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        for i, (proc, read_fd) in enumerate(launched):
            self._await_ready(proc, read_fd, deadline)
            self._procs[i] = proc
        self._watcher.start()
        for sweeper in self._sweepers:
            sweeper.start()
        log.info(
            "%d batch consumer process(es) ready (batch %d, wait %g ms)",
            self.processes,
            self.settings.consumer_batch,
            self.settings.consumer_wait_ms,
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Warm shutdown: each consumer finishes its batch, acknowledges it and exits."""
        self._stopping.set()
        for sweeper in self._sweepers:
            sweeper.stop()
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "batch consumer %d did not stop; killing it (its messages return "
                    "after the visibility timeout)",
                    p.pid,
                )
                p.kill()
                p.wait()

    def pids(self) -> list[int]:
        """Process ids of the running consumers."""
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        proc, read_fd = self._launch(index)
        self._await_ready(proc, read_fd, time.monotonic() + READY_TIMEOUT_S)
        return proc

    def _launch(self, index: int) -> tuple[subprocess.Popen[bytes], int]:
        """Start consumer ``index``; returns it and the pipe end its readiness arrives on."""
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "maas_worker",
                    "batch-consumer",
                    "--ready-fd",
                    str(write_fd),
                    "--name",
                    f"{self.node}/{index}",
                    "--siblings",
                    str(self.processes),
                    "--shard",
                    str(self.shards[index % len(self.shards)]),
                    "--loglevel",
                    self.loglevel,
                ],
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                # SIGKILLed, the node's consumers finish their batch and stop
                # instead of consuming on for a node that is gone.
                preexec_fn=ends_with_parent(),  # noqa: PLW1509 (children.py: no lock taken)
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return proc, read_fd

    @staticmethod
    def _await_ready(proc: subprocess.Popen[bytes], read_fd: int, deadline: float) -> None:
        """Wait until ``proc`` says it is ready (or exits, or ``deadline`` passes)."""
        try:
            wait_s = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([read_fd], [], [], wait_s)
            if not ready or not os.read(read_fd, 1):
                log.error("batch consumer %d did not start (exit status %s)", proc.pid, proc.poll())
        finally:
            os.close(read_fd)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            for i, proc in enumerate(list(self._procs)):
                if proc is None or proc.poll() is None or self._stopping.is_set():
                    continue
                log.error(
                    "batch consumer %d exited with status %s; starting another",
                    proc.pid,
                    proc.returncode,
                )
                time.sleep(RESTART_BACKOFF_S)
                if self._stopping.is_set():
                    return
                with self._lock:
                    self._procs[i] = self._spawn(i)


class Sweeper:
    """kombu's visibility sweep of queue shard ``shard``, run from a thread (see the
    module docstring)."""

    def __init__(self, settings: Settings, shard: int | None = None) -> None:
        from maas_worker.broker.app import transport_options

        self.settings = settings
        self.options = transport_options(settings, shard)
        self.interval_s = float(self.options["unacked_restore_interval"])
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"maas-sweep-{shard or 0}", daemon=True
        )
        self._conn: Any = None

    def start(self) -> None:
        """Sweep every interval until `stop`."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sweeping."""
        self._stop.set()

    def sweep(self) -> None:
        """Put back every reserved message older than the visibility timeout (once)."""
        from kombu import Connection  # type: ignore[attr-defined]

        if self._conn is None:
            s = self.settings
            self._conn = Connection(
                s.broker_url, transport_options=self.options, ssl=s.redis_ssl(s.broker_url) or False
            )  # type: ignore[no-untyped-call]
        channel = self._conn.default_channel
        channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as exc:
                log.warning("visibility sweep failed (%s); retrying", type(exc).__name__)
                with contextlib.suppress(Exception):
                    self._conn.release()
                self._conn = None


#: The worker app's configuration key asking for batch consumers (`configure`). The
#: leading underscore keeps it out of ``celery inspect conf`` replies.
CONF_KEY = "_maas_batch_consumers"


def configure(app: Any, *, processes: int, loglevel: str) -> None:
    """Make the worker of ``app`` run batch consumers (called by ``worker --batch-consumer``).

    The worker's node (worker/node.py) starts them once it is ready.
    """
    app.conf[CONF_KEY] = {"processes": processes, "loglevel": loglevel}


def requested(app: Any) -> dict[str, Any] | None:
    """What `configure` asked of ``app``'s worker: ConsumerPool's keywords; None if nothing."""
    wanted: dict[str, Any] | None = app.conf.get(CONF_KEY)
    return wanted
