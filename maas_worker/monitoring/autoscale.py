"""Pool autoscaling inside a worker: ``maas-worker worker --autoscale MAX,MIN``.

Celery's pool only: ``--autoscale`` selects the Celery-task mode (cli/services.py,
`worker_mode`); batch consumer processes, the default mode, are sized by
``--concurrency``.

Unlike Celery's own autoscaler, which sees only what the worker has reserved
(docs/monitoring.md, "Autoscaling inside a worker"), this one
(``worker_autoscaler`` in app.celery_config) sizes the pool by

- demand: jobs running + jobs reserved and waiting for a process + jobs
  queued in Redis (all priorities; every node consumes all of them);
- the age of the oldest queued job: it grows only for a job that has
  waited ``MAAS_AUTOSCALE_GROW_AFTER_S`` (or one already reserved here), so
  a blip the current pool clears at once forks nothing;
- headroom: it refuses to grow while host memory or CPU use is above
  ``MAAS_AUTOSCALE_MAX_MEMORY_PCT`` / ``MAAS_AUTOSCALE_MAX_CPU_PCT``;
- keep-alive: it shrinks to max(MIN, running) once nothing has waited for
  ``MAAS_AUTOSCALE_KEEPALIVE_S``; billiard only stops idle processes.

Reading Redis and psutil happens in a probe thread every
``MAAS_AUTOSCALE_INTERVAL_S``; the decision runs in Celery's event loop
(which is where the pool may be resized) on the cached reading, so the loop
never blocks on the network.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil
import redis
from celery import current_app
from celery.worker import state as worker_state
from celery.worker.autoscale import Autoscaler

from maas_worker.broker.app import settings_of
from maas_worker.broker.backlog import Backlog, broker_client, read_backlog
from maas_worker.monitoring.memory import read_memory
from maas_worker.protocol import TASK_NAME
from maas_worker.settings import AutoscalePolicy

log = logging.getLogger(__name__)

#: A probe reading older than this many intervals is not acted upon.
STALE_INTERVALS = 5


@dataclass(frozen=True)
class PoolView:
    """What the policy sees at one moment."""

    current: int
    running: int
    waiting: int
    queued: int
    oldest_age_s: float | None
    memory_pct: float
    cpu_pct: float


@dataclass(frozen=True)
class Decision:
    """The pool size to have now, what the backlog alone calls for, and why."""

    target: int
    wanted: int
    reason: str


def decide(
    view: PoolView, *, min_size: int, max_size: int, policy: AutoscalePolicy, quiet_for_s: float
) -> Decision:
    """The pure sizing rule (module docstring); ``quiet_for_s``: time since a job waited."""
    demand = view.running + view.waiting + view.queued
    wanted = max(min_size, min(max_size, demand))
    if view.current < min_size:
        return Decision(min_size, wanted, "below minimum")
    if demand > view.current and view.current < max_size:
        old_enough = view.oldest_age_s is None or view.oldest_age_s >= policy.grow_after_s
        if view.waiting > 0 or (view.queued > 0 and old_enough):
            if view.memory_pct > policy.max_memory_pct:
                return Decision(
                    view.current,
                    wanted,
                    f"no headroom: memory {view.memory_pct:.0f}% > {policy.max_memory_pct:g}%",
                )
            if view.cpu_pct > policy.max_cpu_pct:
                return Decision(
                    view.current,
                    wanted,
                    f"no headroom: cpu {view.cpu_pct:.0f}% > {policy.max_cpu_pct:g}%",
                )
            return Decision(wanted, wanted, "backlog")
        return Decision(view.current, wanted, "backlog too young")
    floor = max(min_size, view.running)
    if view.waiting == 0 and view.queued == 0 and view.current > floor:
        if quiet_for_s >= policy.keepalive_s:
            return Decision(floor, floor, "idle")
        return Decision(view.current, floor, "keep-alive")
    return Decision(view.current, view.current, "steady")


@dataclass(frozen=True)
class _Reading:
    backlog: Backlog
    memory_pct: float
    cpu_pct: float
    at: float


class HeadroomProbe:
    """Daemon thread reading the backlog and the host's memory and CPU use."""

    def __init__(self, client: Any, interval_s: float) -> None:
        self._client = client
        self.interval_s = interval_s
        self.reading: _Reading | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maas-autoscale-probe", daemon=True)
        self._failing = False

    def start(self) -> None:
        """Read once now (so the first decision has data), then keep reading."""
        psutil.cpu_percent(interval=None)  # primes the CPU counter
        self._read()
        self._thread.start()

    def stop(self) -> None:
        """Stop reading."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def _read(self) -> None:
        try:
            backlog = read_backlog(self._client)
        except redis.RedisError as exc:
            if not self._failing:
                log.warning(
                    "autoscaler cannot read the backlog (%s); holding the pool size",
                    type(exc).__name__,
                )
            self._failing = True
            return
        self._failing = False
        self.reading = _Reading(
            backlog,
            read_memory().used_percent,
            float(psutil.cpu_percent(interval=None)),
            time.monotonic(),
        )


def pool_state(scaler: Any) -> dict[str, int] | None:
    """Current, desired, min and max pool size of a worker's autoscaler (None if not ours)."""
    if not isinstance(scaler, BacklogAutoscaler):
        return None
    decision = scaler.last_decision
    current = scaler.processes
    return {
        "current": current,
        "desired": decision.wanted if decision else current,
        "min": scaler.min_concurrency,
        "max": scaler.max_concurrency,
    }


class BacklogAutoscaler(Autoscaler):  # type: ignore[misc]  # Celery is untyped
    """Celery ``worker_autoscaler`` that sizes the pool by the Redis backlog and headroom."""

    def __init__(
        self,
        pool: Any,
        max_concurrency: int,
        min_concurrency: int = 0,
        *,
        worker: Any = None,
        keepalive: float | None = None,
        mutex: Any = None,
    ) -> None:
        settings = settings_of(worker.app if worker is not None else current_app)
        self.policy = settings.autoscale
        # Celery calls maybe_scale every `keepalive` seconds from its event loop:
        # that is our decision interval. The idle keep-alive is policy.keepalive_s.
        super().__init__(
            pool,
            max_concurrency,
            min_concurrency,
            worker=worker,
            keepalive=self.policy.interval_s,
            mutex=mutex,
        )
        self._settings = settings
        self._probe: HeadroomProbe | None = None
        self._quiet_since = time.monotonic()
        self.last_decision: Decision | None = None

    # Celery's hooks ------------------------------------------------------------------------
    def _maybe_scale(self, req: Any = None) -> bool:
        view = self._view()
        if view is None:
            return False
        now = time.monotonic()
        if view.queued or view.waiting:
            self._quiet_since = now
        decision = decide(
            view,
            min_size=self.min_concurrency,
            max_size=self.max_concurrency,
            policy=self.policy,
            quiet_for_s=now - self._quiet_since,
        )
        self._log(decision, view)
        self.last_decision = decision
        if decision.target > view.current:
            self.scale_up(decision.target - view.current)
            self._quiet_since = now
            return True
        if decision.target < view.current:
            self._shrink(view.current - decision.target)
            return True
        return False

    def info(self) -> dict[str, Any]:
        """For ``celery inspect stats``: Celery's fields plus the last decision."""
        out: dict[str, Any] = super().info()
        if self.last_decision is not None:
            out.update(desired=self.last_decision.wanted, reason=self.last_decision.reason)
        return out

    def stop(self) -> None:
        """Stop the probe with the autoscaler."""
        if self._probe is not None:
            self._probe.stop()
        if self.is_alive():  # a thread only without Celery's event loop
            super().stop()

    # ---------------------------------------------------------------------------------------
    def _view(self) -> PoolView | None:
        if self._probe is None:
            # Started on first use, in the running worker (never before the pool forks).
            self._probe = HeadroomProbe(broker_client(self._settings), self.policy.interval_s)
            self._probe.start()
        reading = self._probe.reading
        if reading is None or time.monotonic() - reading.at > STALE_INTERVALS * max(
            self.policy.interval_s, 1.0
        ):
            return None
        # Jobs only: a resource sample passing through must not hold the pool up.
        running = sum(1 for r in list(worker_state.active_requests) if r.name == TASK_NAME)
        reserved = sum(1 for r in list(worker_state.reserved_requests) if r.name == TASK_NAME)
        return PoolView(
            current=self.processes,
            running=running,
            waiting=max(0, reserved - running),
            queued=reading.backlog.total,
            oldest_age_s=reading.backlog.oldest_s,
            memory_pct=reading.memory_pct,
            cpu_pct=reading.cpu_pct,
        )

    def _log(self, decision: Decision, view: PoolView) -> None:
        last = self.last_decision
        if last is not None and (last.target, last.reason) == (decision.target, decision.reason):
            return
        if decision.target != view.current or decision.reason.startswith("no headroom"):
            log.info(
                "autoscale: %d -> %d processes (%s; running %d, waiting %d, queued %d, "
                "oldest %s s)",
                view.current,
                decision.target,
                decision.reason,
                view.running,
                view.waiting,
                view.queued,
                "-" if view.oldest_age_s is None else f"{view.oldest_age_s:.1f}",
            )
