"""Helpers for the monitoring tests: beat, Flower and exporter processes, autoscaled workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from maas_worker.local.processes import WorkerProcess

from .conftest import Stack


class Service:
    """``python -m maas_worker ARGS`` in its own session, with a log file."""

    def __init__(
        self, stack: Stack, name: str, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path: Path = stack.tmp / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maas_worker", *args],
                env={**stack.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_worker(
    stack: Stack,
    name: str,
    *,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    concurrency: int = 1,
) -> WorkerProcess:
    """A worker with extra flags (``--autoscale``), torn down with the stack."""
    w = WorkerProcess(
        env={**stack.env, **(env or {})},
        name=name,
        log_path=stack.tmp / f"{name}.log",
        concurrency=concurrency,
        extra_args=extra_args,
    )
    stack.workers.append(w)
    w.start()
    w.wait_ready(stack.backend)
    return w


def pool_size(worker: WorkerProcess) -> int:
    """Pool processes of a running prefork worker, counted by the OS."""
    assert worker.proc is not None
    return len(psutil.Process(worker.proc.pid).children(recursive=False))


def http_get(url: str, *, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET; (0, "") while nothing listens yet."""
    req = urllib.request.Request(url)
    if auth is not None:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""
