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

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from celery.beat import Scheduler

log = logging.getLogger(__name__)

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
    """Celery's in-memory scheduler that records its next tick's deadline after each tick,
    and sends each task on every queue shard (MAAS_QUEUE_SHARDS): a worker node hears
    the ``maas.sample`` broadcast on its own Celery connection, which is on its first
    shard (shards.py), so every shard gets it."""

    _shard_apps: list[Any] | None = None

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        """Send ``entry`` as Celery does (on beat's own shard), then on each other shard."""
        result = super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        for app in self._other_shards():
            try:
                app.send_task(entry.task, args=entry.args, kwargs=entry.kwargs, **entry.options)
            except Exception as exc:  # one shard's outage must not stop the others' ticks
                log.warning("could not send %s on a queue shard: %s", entry.task, exc)
        return result

    def _other_shards(self) -> list[Any]:
        """One Celery app per queue shard other than beat's own (built once)."""
        if self._shard_apps is None:
            from celery import Celery

            from maas_worker.broker import shards
            from maas_worker.broker.app import settings_of, transport_options

            settings = settings_of(self.app)
            own = shards.consumed(settings)[0]
            self._shard_apps = []
            for k in shards.all_shards(settings):
                if k == own:
                    continue
                app = Celery("maas_worker", set_as_current=False)
                app.conf.update(dict(self.app.conf.changes))
                app.conf.broker_transport_options = transport_options(settings, k)
                self._shard_apps.append(app)
        return self._shard_apps

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Run what is due, then promise the next tick (when the file is configured)."""
        delay = float(super().tick(*args, **kwargs))
        path = self.app.conf.get(ALIVE_FILE_CONF)
        if path:
            write_deadline(Path(path), time.time() + max(delay, 0.0) + ALIVE_GRACE_S)
        return delay
