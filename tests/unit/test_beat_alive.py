"""Beat's liveness file (maas_worker/monitoring/beat.py), the compose `beat` health check."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from celery import Celery

from maas_worker.monitoring.beat import (
    ALIVE_FILE_CONF,
    ALIVE_GRACE_S,
    AliveScheduler,
    is_alive,
    write_deadline,
)
from maas_worker.monitoring.samples import celery_options
from maas_worker.settings import Settings


def _scheduler(alive_file: Path | None) -> AliveScheduler:
    app = Celery("beat-alive-test", broker="memory://", set_as_current=False)
    app.conf[ALIVE_FILE_CONF] = str(alive_file) if alive_file else None
    # An empty schedule: tick() runs nothing and returns the max loop interval.
    return AliveScheduler(app, schedule={}, max_interval=7, lazy=False)


def test_each_tick_promises_the_next_one(tmp_path: Path) -> None:
    alive = tmp_path / "beat.alive"
    before = time.time()
    delay = _scheduler(alive).tick()
    after = time.time()
    deadline = float(alive.read_text())
    assert delay == 7
    # Written to the millisecond (rounded either way: half a millisecond of slack).
    assert (
        before + delay + ALIVE_GRACE_S - 0.0005
        <= deadline
        <= after + delay + ALIVE_GRACE_S + 0.0005
    )
    assert is_alive(alive, now=deadline)
    assert not is_alive(alive, now=deadline + 0.01)


def test_no_file_without_the_setting(tmp_path: Path) -> None:
    _scheduler(None).tick()
    assert list(tmp_path.iterdir()) == []


def test_missing_or_garbled_file_is_not_alive(tmp_path: Path) -> None:
    alive = tmp_path / "beat.alive"
    assert not is_alive(alive)
    alive.write_text("not a time")
    assert not is_alive(alive)


def test_the_compose_health_check_command_reads_the_file(tmp_path: Path) -> None:
    """The one-liner in docker/compose.yaml's beat healthcheck, run for real."""
    alive = tmp_path / "beat.alive"
    check = f"import sys, time; sys.exit(time.time() > float(open({str(alive)!r}).read()))"
    write_deadline(alive, time.time() + 60)
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 0
    write_deadline(alive, time.time() - 1)
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 1


def test_celery_options_use_the_alive_scheduler(tmp_path: Path) -> None:
    alive = tmp_path / "beat.alive"
    opts = celery_options(Settings.from_env({"MAAS_BEAT_ALIVE_FILE": str(alive)}))
    assert opts["beat_scheduler"] == "maas_worker.monitoring.beat:AliveScheduler"
    assert opts[ALIVE_FILE_CONF] == str(alive)
    assert celery_options(Settings.from_env({}))[ALIVE_FILE_CONF] is None
