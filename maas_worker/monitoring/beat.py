"""Celery beat's scheduler, with a liveness file for container health checks.

Beat has no port and no control channel a health check could ask, and a live
process proves nothing: a beat blocked on a lost broker, or whose loop hung,
still runs. So after each tick the scheduler writes, to
``MAAS_BEAT_ALIVE_FILE``, the unix time by which it will have ticked again
(the delay Celery is about to sleep, plus a grace). A check passes while that
time is ahead of the clock, whatever the sample interval:

    python -c "import sys, time; sys.exit(time.time() > float(open(PATH).read()))"
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from celery.beat import Scheduler

#: Celery configuration key holding the file (set from Settings.beat_alive_file).
ALIVE_FILE_CONF = "maas_beat_alive_file"

#: Seconds added to each promised tick: publishing the due task, a slow host.
ALIVE_GRACE_S = 30.0


def write_deadline(path: Path, deadline: float) -> None:
    """Replace ``path`` with ``deadline`` atomically: a check never reads half a number."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{deadline:.3f}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_alive(path: Path, now: float | None = None) -> bool:
    """Whether beat's last promise in ``path`` still holds (False if there is none)."""
    try:
        deadline = float(path.read_text())
    except (OSError, ValueError):
        return False
    return (time.time() if now is None else now) <= deadline


class AliveScheduler(Scheduler):  # type: ignore[misc]  # Celery is untyped
    """Celery's in-memory scheduler that records its next tick's deadline after each tick."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Run what is due, then promise the next tick (when the file is configured)."""
        delay = float(super().tick(*args, **kwargs))
        path = self.app.conf.get(ALIVE_FILE_CONF)
        if path:
            write_deadline(Path(path), time.time() + max(delay, 0.0) + ALIVE_GRACE_S)
        return delay
