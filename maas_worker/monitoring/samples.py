"""Resource samples: what every worker node records on each beat tick, and where.

Beat broadcasts one ``maas.sample`` message every ``MAAS_SAMPLE_INTERVAL_S`` on the
fanout exchange ``maas.monitor`` (a kombu ``Broadcast`` queue): every node subscribed
at that moment samples itself once, in its pool; the message is acknowledged on receipt
and expires after one interval. A sample covers the whole host (CPU, memory, swap,
load, disk and network counters, NVML GPUs when ``nvidia-ml-py`` is installed), the
worker's own pool and the node's job counters (metrics.py). docs/monitoring.md,
"Resource samples", has the design and the fields.

Invariants: one key per node in the result backend, ``maas:sample:<node>``, with a TTL
of `SAMPLE_TTL_INTERVALS` intervals, and an index sorted set pruned on every write, so
storage is bounded by the number of live nodes however long the system runs; a sample
holds no job data at all.

Where a sample is read: ``maas-worker stats`` and the fleet exporter (`SampleStore.latest`),
and the node's own ``stats`` remote-control reply (`stats_fields`), which is what Flower
shows on the worker's page and in ``/api/workers``. The sample task sends no task events
(monitoring/tasks.py), so samples never appear in Flower's task list or counters.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psutil
import redis

from maas_worker.backend import keyspace
from maas_worker.backend.cluster import mget_many
from maas_worker.monitoring.memory import read_memory
from maas_worker.protocol import MONITOR_EXCHANGE, SAMPLE_TASK
from maas_worker.settings import Settings

#: A sample older than this many intervals is not current (and its key is gone).
SAMPLE_TTL_INTERVALS = 3
#: CPU use is measured over this window when the sample is taken.
CPU_WINDOW_S = 0.2
SAMPLE_VERSION = 1


def monitor_exchange() -> Any:
    """The fanout exchange sample requests are published to."""
    from kombu import Exchange  # type: ignore[attr-defined]

    return Exchange(MONITOR_EXCHANGE, type="fanout")  # type: ignore[no-untyped-call]


def monitor_queue() -> Any:
    """The broadcast queue sample requests arrive on (every node consumes it)."""
    from kombu.common import Broadcast

    # A fixed queue name: on Redis a fanout reaches every subscriber whatever
    # the name, and one name keeps kombu's binding table from growing by one
    # entry per worker start. The routing key is explicit because kombu's
    # Redis fanout channel name includes it: publisher and subscribers agree.
    return Broadcast(
        MONITOR_EXCHANGE,
        queue=MONITOR_EXCHANGE,  # type: ignore[no-untyped-call]
        exchange=monitor_exchange(),
        routing_key=MONITOR_EXCHANGE,
    )


def sample_options(interval_s: float) -> dict[str, Any]:
    """``apply_async`` options of a sample request.

    Celery does not declare a Broadcast queue's exchange when it publishes, and
    kombu's Redis transport treats an undeclared exchange as direct (it would
    LPUSH to a list nobody reads): declare the fanout exchange explicitly.
    """
    return {
        "queue": MONITOR_EXCHANGE,
        "exchange": MONITOR_EXCHANGE,
        "routing_key": MONITOR_EXCHANGE,
        "declare": [monitor_exchange()],
        "expires": interval_s,
    }


def celery_options(settings: Settings) -> dict[str, Any]:
    """Celery settings for monitoring and scaling, merged into app.celery_config."""
    return {
        # Flower shows jobs from the moment they are queued: task events from
        # workers (the task-sent event is the producers', broker/app.py).
        "worker_send_task_events": True,
        # The one task this app publishes is beat's sample request: its
        # task-sent event would add a row to Flower's task list every tick.
        "task_send_sent_event": False,
        "task_routes": {SAMPLE_TASK: {"queue": MONITOR_EXCHANGE}},
        "beat_schedule": {
            "maas-sample": {
                "task": SAMPLE_TASK,
                "schedule": settings.sample_interval_s,
                "options": sample_options(settings.sample_interval_s),
                # Due at once when beat starts, not one interval later: a fresh
                # deployment's `maas-worker stats` has samples within a second.
                "last_run_at": datetime.fromtimestamp(0, UTC),
            }
        },
        # The schedule is one fixed interval: nothing worth persisting, and no
        # celerybeat-schedule file left in the working directory. Celery's
        # in-memory scheduler, plus a liveness file for health checks.
        "beat_scheduler": "maas_worker.monitoring.beat:AliveScheduler",
        "maas_beat_alive_file": (
            str(settings.beat_alive_file) if settings.beat_alive_file else None
        ),
        "worker_autoscaler": "maas_worker.monitoring.autoscale:BacklogAutoscaler",
    }


# -- taking a sample ---------------------------------------------------------------------------
def _proc_stats(proc: psutil.Process) -> tuple[int, int] | None:
    """(RSS bytes, open file descriptors) of one process, None if it is gone."""
    try:
        with proc.oneshot():
            rss = int(proc.memory_info().rss)
            try:
                fds = int(proc.num_fds())
            except (AttributeError, psutil.AccessDenied):  # not Linux/BSD
                fds = len(proc.open_files())
        return rss, fds
    except psutil.Error:
        return None


def pool_sample(main_pid: int) -> dict[str, Any]:
    """The worker's main process and its pool children."""
    try:
        main = psutil.Process(main_pid)
        children = main.children(recursive=False)
    except psutil.Error:
        return {"processes": 0, "rss_bytes": [], "open_fds": [], "main_rss_bytes": None}
    stats = [s for s in (_proc_stats(c) for c in children) if s is not None]
    main_stats = _proc_stats(main)
    return {
        "processes": len(stats),
        "rss_bytes": [rss for rss, _ in stats],
        "open_fds": [fds for _, fds in stats],
        "main_rss_bytes": main_stats[0] if main_stats else None,
    }


_nvml_state: dict[str, Any] = {}
_nvml_lock = threading.Lock()


def gpu_sample() -> list[dict[str, Any]] | None:
    """Utilisation and memory of each NVIDIA GPU; None without NVML (silently)."""
    with _nvml_lock:
        if "nvml" not in _nvml_state:
            try:
                # nvidia-ml-py, the optional ``gpu`` extra (untyped, hence import_module).
                pynvml: Any = importlib.import_module("pynvml")
                pynvml.nvmlInit()
                _nvml_state["nvml"] = pynvml
            except Exception:  # not installed, no driver, no device: no GPU section
                _nvml_state["nvml"] = None
        nvml = _nvml_state["nvml"]
    if nvml is None:
        return None
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": i,
                    "utilization_percent": float(util.gpu),
                    "memory_used_bytes": int(mem.used),
                    "memory_total_bytes": int(mem.total),
                }
            )
        return gpus
    except Exception:
        return None


def take_sample(
    node: str, *, main_pid: int, interval_s: float, jobs: tuple[float, float] | None = None
) -> dict[str, Any]:
    """A JSON-ready resource sample of this host and of the worker ``main_pid``.

    ``jobs`` is (jobs finished, busy seconds) of the node so far, for
    throughput (`SampleStore.record` turns it into rates).
    """
    per_core = [float(p) for p in psutil.cpu_percent(interval=CPU_WINDOW_S, percpu=True)]
    vm = read_memory()
    swap = psutil.swap_memory()
    disk = psutil.disk_io_counters(perdisk=False)
    net = psutil.net_io_counters(pernic=False)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    sample: dict[str, Any] = {
        "v": SAMPLE_VERSION,
        "node": node,
        "at": time.time(),
        "interval_s": interval_s,
        "cpu": {
            "percent": round(sum(per_core) / len(per_core), 1) if per_core else None,
            "per_core": per_core,
            "cores": len(per_core),
        },
        "memory": {
            # The container's limit and use where it has one (memory.py): "scope".
            "total_bytes": vm.total_bytes,
            "available_bytes": vm.available_bytes,
            "used_percent": vm.used_percent,
            "scope": vm.scope,
        },
        "swap": {
            "total_bytes": int(swap.total),
            "used_bytes": int(swap.used),
            "used_percent": float(swap.percent),
        },
        "load": load,
        "disk": None
        if disk is None
        else {
            "read_bytes": int(disk.read_bytes),
            "write_bytes": int(disk.write_bytes),
            "reads": int(disk.read_count),
            "writes": int(disk.write_count),
        },
        "net": None
        if net is None
        else {
            "bytes_sent": int(net.bytes_sent),
            "bytes_recv": int(net.bytes_recv),
            "packets_sent": int(net.packets_sent),
            "packets_recv": int(net.packets_recv),
            "errors_in": int(net.errin),
            "errors_out": int(net.errout),
            "drops_in": int(net.dropin),
            "drops_out": int(net.dropout),
        },
        "pool": pool_sample(main_pid),
        "jobs": None if jobs is None else {"finished": jobs[0], "busy_s": round(jobs[1], 3)},
    }
    gpus = gpu_sample()
    if gpus is not None:
        sample["gpu"] = gpus
    return sample


# -- readable form (`maas-worker stats`, Flower's worker page) ------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def summarize(sample: Mapping[str, Any]) -> dict[str, str]:
    """A short, human-readable rendering of a sample (strings only, < 1 KiB)."""
    cpu = sample.get("cpu") or {}
    cores = cpu.get("per_core") or []
    shown = " ".join(f"{c:.0f}" for c in cores[:16]) + (" ..." if len(cores) > 16 else "")
    mem = sample.get("memory") or {}
    swap = sample.get("swap") or {}
    pool = sample.get("pool") or {}
    processes = int(pool.get("processes") or 0)
    out = {
        "node": str(sample.get("node")),
        "cpu": f"{cpu.get('percent')}% (per core: {shown})",
        "memory": f"{mem.get('used_percent')}% used, "
        f"{_mib(mem.get('available_bytes', 0))} available of {_mib(mem.get('total_bytes', 0))}"
        + (" (container limit)" if mem.get("scope") == "cgroup" else ""),
        "swap": f"{swap.get('used_percent')}% used of {_mib(swap['total_bytes'])}"
        if swap.get("total_bytes")
        else "none",
        "load": " ".join(str(x) for x in sample.get("load") or []) or "n/a",
        "pool": f"{processes} process{'' if processes == 1 else 'es'}, RSS "
        + (" + ".join(_mib(r) for r in (pool.get("rss_bytes") or [])[:8]) or "-")
        + f", open fds {sum(pool.get('open_fds') or [])}"
        + (f"; main process RSS {_mib(main)}" if (main := pool.get("main_rss_bytes")) else ""),
    }
    gpus = sample.get("gpu")
    out["gpu"] = (
        "; ".join(
            f"#{g['index']} {g['utilization_percent']:.0f}% {_mib(g['memory_used_bytes'])}/"
            f"{_mib(g['memory_total_bytes'])}"
            for g in gpus
        )
        if gpus
        else "none"
    )
    jobs = sample.get("jobs") or {}
    rate = jobs.get("per_s")
    busy = jobs.get("busy_fraction")
    out["jobs"] = (
        f"{jobs.get('finished', 0):.0f} finished"
        + (f", {rate:.2f}/s" if isinstance(rate, int | float) else "")
        + (f", pool {busy:.0%} busy" if isinstance(busy, int | float) else "")
    )
    return out


#: Key of the whole sample document in a worker's ``stats`` reply (`stats_fields`).
STATS_KEY = "sample"
#: Prefix of the readable rows next to it (``sample cpu``, ``sample memory``, ...).
STATS_ROW_PREFIX = "sample "


def stats_fields(
    sample: Mapping[str, Any] | None, *, now: float, interval_s: float
) -> dict[str, Any]:
    """A node's latest sample as its ``stats`` remote-control reply carries it.

    Flower shows the reply on the worker's page and returns it from
    ``/api/workers``; the page lists every key Celery does not define on its
    *Other* tab, one row per key, with ``str()`` of the value. So the sample
    comes twice: flat readable rows (``sample taken``, ``sample cpu``, ...,
    `summarize`'s text), which read as a table there, then the whole document
    under `STATS_KEY` for programs (``None`` when the node has no current
    sample: beat is not running, or the node was too busy to take one).
    """
    if sample is None:
        return {
            f"{STATS_ROW_PREFIX}taken": f"none in the last {sample_ttl_s(interval_s)} s "
            f"(beat asks for one every {interval_s:g} s: is it running?)",
            STATS_KEY: None,
        }
    at = float(sample.get("at") or 0.0)
    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    rows: dict[str, Any] = {
        f"{STATS_ROW_PREFIX}taken": f"{taken}, {max(0.0, now - at):.1f} s before this reply "
        f"(one every {interval_s:g} s)"
    }
    rows.update(
        (f"{STATS_ROW_PREFIX}{name}", text)
        for name, text in summarize(sample).items()
        if name != "node"  # the page is the node's own
    )
    rows[STATS_KEY] = dict(sample)
    return rows


# -- storage -----------------------------------------------------------------------------------
def sample_ttl_s(interval_s: float) -> int:
    """Seconds a sample stays current: `SAMPLE_TTL_INTERVALS` intervals, at least 1 s."""
    return max(1, math.ceil(SAMPLE_TTL_INTERVALS * interval_s))


class SampleStore:
    """The latest sample of each worker node, in Redis, expiring on its own."""

    def __init__(self, client: redis.Redis, *, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s
        self.ttl_s = sample_ttl_s(interval_s)

    def record(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Store ``sample`` as its node's latest; adds rates since the previous one."""
        node = str(sample["node"])
        key = keyspace.sample(node)
        previous = self._load(self.client.get(key))
        _add_rates(sample, previous)
        now = float(sample["at"])
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, json.dumps(sample, separators=(",", ":")), ex=self.ttl_s)
        pipe.zadd(keyspace.SAMPLES, {node: now})
        pipe.zremrangebyscore(keyspace.SAMPLES, "-inf", now - self.ttl_s)
        pipe.execute()
        return sample

    def latest(self, *, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Current samples by node (younger than the TTL), oldest node name first."""
        now = time.time() if now is None else now
        nodes = [n.decode() for n in self._zrange(now - self.ttl_s)]
        if not nodes:
            return {}
        # One slot a node on a Redis Cluster: mget_many reads each node's where it is.
        raw = mget_many(self.client, [keyspace.sample(n) for n in nodes])
        out = {}
        for node, data in zip(nodes, raw, strict=True):
            sample = self._load(data)
            if sample is not None and now - float(sample.get("at", 0)) <= self.ttl_s:
                out[node] = sample
        return dict(sorted(out.items()))

    def get(self, node: str, *, now: float | None = None) -> dict[str, Any] | None:
        """The current sample of ``node`` (younger than the TTL), or None."""
        now = time.time() if now is None else now
        sample = self._load(self.client.get(keyspace.sample(node)))
        if sample is None or now - float(sample.get("at", 0)) > self.ttl_s:
            return None
        return sample

    def forget(self, node: str) -> None:
        """Remove a node's sample at once (clean shutdown)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(keyspace.sample(node))
        pipe.zrem(keyspace.SAMPLES, node)
        pipe.execute()

    def _zrange(self, since: float) -> list[bytes]:
        rows: list[bytes] = self.client.zrangebyscore(keyspace.SAMPLES, since, "+inf")  # type: ignore[assignment]
        return rows

    @staticmethod
    def _load(data: object) -> dict[str, Any] | None:
        if not isinstance(data, bytes | str):
            return None
        try:
            doc = json.loads(data)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and doc.get("v") == SAMPLE_VERSION else None


def _add_rates(sample: dict[str, Any], previous: Mapping[str, Any] | None) -> None:
    """Jobs per second and busy fraction of the pool since ``previous`` (or None)."""
    jobs = sample.get("jobs")
    if not isinstance(jobs, dict):
        return
    jobs["per_s"] = jobs["busy_fraction"] = None
    prev = (previous or {}).get("jobs")
    if not isinstance(prev, dict):
        return
    dt = float(sample["at"]) - float(previous["at"]) if previous else 0.0
    done = float(jobs["finished"]) - float(prev.get("finished", 0))
    busy = float(jobs["busy_s"]) - float(prev.get("busy_s", 0))
    if dt <= 0 or done < 0 or busy < 0:  # first sample after a restart: counters reset
        return
    processes = max(1, int((sample.get("pool") or {}).get("processes") or 1))
    jobs["per_s"] = round(done / dt, 4)
    jobs["busy_fraction"] = round(min(1.0, busy / (dt * processes)), 4)
