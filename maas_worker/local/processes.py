"""Local worker processes: started, awaited, stopped (used by ``demo`` and the tests).

A worker is ready when it has announced itself in the result backend's node
list (`runtime.Advertiser`), which happens after its consumer is listening:
waiting for that is a condition, not a guess at how long startup takes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from maas_worker.backend import keyspace
from maas_worker.errors import ConfigError

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class WorkerProcess:
    """``maas-worker worker`` as a child process with its own log file."""

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        name: str,
        log_path: Path,
        concurrency: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.env = dict(env)
        self.name = name
        self.node = f"{name}@{os.uname().nodename}"
        self.log_path = log_path
        self.concurrency = concurrency
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        """The command line the worker runs (`maas-worker worker` on this node name)."""
        return [
            sys.executable,
            "-m",
            "maas_worker",
            "worker",
            "--hostname",
            self.node,
            "--concurrency",
            str(self.concurrency),
            *self.extra_args,
        ]

    def start(self) -> WorkerProcess:
        """Start the worker (in its own process group, so the pool dies with it)."""
        cmd = self.argv()
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    def wait_ready(self, backend: redis.Redis, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until the worker has announced itself; raise if it died or timed out."""
        deadline = time.monotonic() + timeout_s
        since = time.time() - 1
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ConfigError(f"worker {self.name} exited during startup:\n{self.log_tail()}")
            score = backend.zscore(keyspace.NODES, self.node)
            if score is not None and score >= since:
                return
            time.sleep(0.05)
        raise ConfigError(f"worker {self.name} not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the worker's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Warm shutdown (SIGTERM: finish running jobs), then SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once (a crash)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def _reap_group(self) -> None:
        # Pool children left behind by a killed parent would keep consuming.
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
