"""The worker node's lifecycle (worker/node.py): what starts with a worker stops with it.

Real Valkey, real workers. While a worker runs, it is announced, its models
are in the catalogue, its ``/metrics`` answers and its private metrics
directory exists; after a warm shutdown (SIGTERM) the node is withdrawn, the
endpoint closed, the directory removed and, in the batch consumer mode, its
consumer processes have exited on their own.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from maas_worker.backend import keyspace
from maas_worker.local.embedded import free_port
from maas_worker.local.processes import WorkerProcess

from .conftest import Stack
from .services import http_get

pytestmark = pytest.mark.integration
WAIT_S = 60.0


def metrics_dirs(worker: WorkerProcess) -> list[Path]:
    """The private metrics directories of ``worker``'s main process (metrics.py)."""
    assert worker.proc is not None
    return list(Path(tempfile.gettempdir()).glob(f"maas-metrics-{worker.proc.pid}-*"))


def batch_consumers(worker: WorkerProcess) -> list[psutil.Process]:
    """The ``maas-worker batch-consumer`` children of ``worker``."""
    assert worker.proc is not None
    return [
        c for c in psutil.Process(worker.proc.pid).children() if "batch-consumer" in c.cmdline()
    ]


def warm_stop(worker: WorkerProcess) -> int:
    """SIGTERM the worker's main process alone and wait for it: nothing else stops it."""
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    return worker.proc.wait(WAIT_S)


@pytest.mark.parametrize("mode", [("--celery-tasks",), ()], ids=["task", "batch"])
def test_what_starts_with_the_worker_stops_with_a_warm_shutdown(
    make_stack: Callable[..., Stack], mode: tuple[str, ...]
) -> None:
    port = free_port()
    stack = make_stack(MAAS_METRICS_PORT=str(port), MAAS_METRICS_ADDRESS="127.0.0.1")
    worker = stack.start_worker("life", concurrency=2, args=mode)
    assert stack.backend.zscore(keyspace.NODES, worker.node) is not None
    assert {b"echo@1", b"sleep@1"} <= set(stack.backend.zrange(keyspace.CATALOG, 0, -1))
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "maas_jobs_total" in body
    assert len(metrics_dirs(worker)) == 1
    consumers = batch_consumers(worker)
    assert len(consumers) == (0 if "--celery-tasks" in mode else 2)
    assert stack.client().submit("echo", {"x": 1}).result(timeout=WAIT_S) == {"echo": {"x": 1}}

    assert warm_stop(worker) == 0
    assert stack.backend.zscore(keyspace.NODES, worker.node) is None
    assert http_get(f"http://127.0.0.1:{port}/metrics") == (0, "")
    assert metrics_dirs(worker) == []
    # The consumers were asked to stop and waited for, not left to the process group's kill.
    _, alive = psutil.wait_procs(consumers, timeout=0)
    assert alive == []
    assert "maas worker life@" in worker.log_path.read_text()
