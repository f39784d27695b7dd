"""The repository's Procfile under honcho: every process starts, a job completes, all stop.

honcho runs each Procfile line in its own session, so stopping honcho alone
is not trusted: every process it started is recorded while it runs and any
survivor is killed (and the test fails) at the end.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from celery.utils.nodenames import default_nodename

from maas_worker.backend import keyspace
from maas_worker.local.embedded import free_port

from .conftest import Stack, wait_for

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
HONCHO = shutil.which("honcho", path=str(Path(sys.executable).parent)) or shutil.which("honcho")
STOP_TIMEOUT_S = 30.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(HONCHO is None, reason="honcho is not installed (pip install -e '.[dev]')"),
]


def http_status(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET; (0, "") while nothing listens."""
    req = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


class Honcho:
    """``honcho start`` on the Procfile, in its own session, output to a log file."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.log_path = workdir / "honcho.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(HONCHO), "start", "--no-colour", "-f", str(PROCFILE), "-d", str(workdir)],
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.seen: dict[int, psutil.Process] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def record_children(self) -> None:
        """Remember every process honcho has started so far (they leave its session)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)

    def stop(self) -> list[str]:
        """SIGTERM honcho (it stops its processes); return what had to be killed after."""
        self.record_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        survivors = []
        deadline = time.monotonic() + 5
        for pid, proc in self.seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.wait(max(0.1, deadline - time.monotonic()))
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                if proc.is_running():
                    survivors.append(f"{pid} {' '.join(proc.cmdline())[:80]}")
                    proc.kill()
        return survivors


@pytest.fixture
def procfile_env(make_stack: Callable[..., Stack]) -> tuple[Stack, dict[str, str]]:
    stack = make_stack(MAAS_SAMPLE_INTERVAL_S="1")
    env = {
        **stack.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MAAS_FLOWER_BASIC_AUTH": f"ops:{secrets.token_hex(16)}",
        "MAAS_FLOWER_PORT": str(free_port()),
        "MAAS_METRICS_PORT": str(free_port()),
        "MAAS_FLEET_METRICS_PORT": str(free_port()),
    }
    return stack, env


@pytest.fixture
def honcho(procfile_env: tuple[Stack, dict[str, str]]) -> Iterator[Honcho]:
    stack, env = procfile_env
    h = Honcho(env, stack.tmp)
    try:
        yield h
    finally:
        survivors = h.stop()
        assert not survivors, f"processes left after honcho stopped: {survivors}"


def test_procfile_runs_a_job_end_to_end_and_stops_cleanly(
    procfile_env: tuple[Stack, dict[str, str]], honcho: Honcho
) -> None:
    stack, env = procfile_env
    node = default_nodename(None)

    def worker_ready() -> bool:
        assert honcho.proc.poll() is None, f"honcho exited:\n{honcho.log()[-3000:]}"
        honcho.record_children()
        return stack.backend.zscore(keyspace.NODES, node) is not None

    wait_for(worker_ready, 60, f"worker {node} from the Procfile")

    user, password = env["MAAS_FLOWER_BASIC_AUTH"].split(":", 1)
    flower = f"http://127.0.0.1:{env['MAAS_FLOWER_PORT']}/"
    wait_for(lambda: http_status(flower, (user, password))[0] == 200, 60, "Flower")
    assert http_status(flower)[0] == 401
    assert http_status(flower, (user, "wrong"))[0] == 401

    job = stack.client().submit("echo", {"via": "procfile"}, priority="high")
    assert job.result(timeout=30) == {"echo": {"via": "procfile"}}

    # beat is alive: its sample requests reach the worker, which stores a sample.
    wait_for(lambda: stack.backend.exists(keyspace.sample(node)), 30, "a resource sample")
    exporter = f"http://127.0.0.1:{env['MAAS_FLEET_METRICS_PORT']}/metrics"
    _, body = wait_for(
        lambda: (r := http_status(exporter))[0] == 200 and r, 30, "the fleet exporter"
    )
    assert "maas_fleet_up 1.0" in body

    ping = subprocess.run(
        [sys.executable, "-m", "maas_worker", "ping"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.strip() == f"{node}: pong"

    honcho.record_children()
    started = set(re.findall(r"\| (\w+)\.\d+ started \(pid=", honcho.log()))
    assert started == {"worker", "beat", "flower", "metrics"}
    survivors = honcho.stop()
    assert not survivors
    assert password not in honcho.log()
