"""The fleet exporter, ``maas-worker metrics``: one Prometheus target for the whole fleet.

Per-worker endpoints (metrics.py) carry what only a worker knows: its jobs'
outcomes and timings and its autoscaler. What describes the fleet is read
from Redis at each scrape and served here, by a process that does not
depend on any worker running (KEDA must see a backlog to scale from zero):

- the backlog: jobs and the oldest job's age per priority, per priority and tenant,
  and the total (broker/backlog.py);
- every worker node's latest resource sample (samples.py), as gauges
  with a ``worker`` label (and the OS's cumulative disk and network counters
  as counters);
- the fleet-size recommendation (fleet.py): ``maas_fleet_desired_nodes``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from maas_worker.backend.redis import backend_client
from maas_worker.broker.backlog import broker_client
from maas_worker.monitoring.fleet import read_fleet
from maas_worker.settings import Settings


def _sample_gauges(samples: dict[str, dict[str, Any]], now: float) -> Iterator[Any]:
    """Gauges (and OS counters) from each worker node's latest resource sample."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, text: str, extra: tuple[str, ...] = ()) -> Any:
        return GaugeMetricFamily(name, text, labels=["worker", *extra])

    cpu = gauge("maas_worker_cpu_percent", "Host CPU use, all cores")
    core = gauge("maas_worker_cpu_core_percent", "Host CPU use per core", ("core",))
    mem = gauge("maas_worker_memory_used_percent", "Host memory in use")
    avail = gauge("maas_worker_memory_available_bytes", "Host memory available")
    swap = gauge("maas_worker_swap_used_percent", "Host swap in use")
    load = gauge("maas_worker_load_average", "Host load average", ("period",))
    procs = gauge("maas_worker_pool_processes", "Pool processes of the worker")
    rss = gauge("maas_worker_pool_rss_bytes", "Resident memory of all pool processes")
    rss_max = gauge(
        "maas_worker_pool_max_child_rss_bytes", "Resident memory of the largest pool process"
    )
    fds = gauge("maas_worker_pool_open_fds", "Open file descriptors of all pool processes")
    rate = gauge("maas_worker_jobs_per_second", "Jobs finished per second over the last interval")
    busy = gauge(
        "maas_worker_busy_fraction", "Share of the pool busy with jobs over the last interval"
    )
    age = gauge("maas_worker_sample_age_seconds", "Age of the worker's latest sample")
    gpu_util = gauge("maas_worker_gpu_utilization_percent", "GPU utilisation (NVML)", ("gpu",))
    gpu_mem = gauge("maas_worker_gpu_memory_used_bytes", "GPU memory in use (NVML)", ("gpu",))
    io = {
        name: CounterMetricFamily(name, text, labels=["worker"])
        for name, text in (
            ("maas_worker_disk_read_bytes", "Host disk bytes read"),
            ("maas_worker_disk_written_bytes", "Host disk bytes written"),
            ("maas_worker_network_received_bytes", "Host network bytes received"),
            ("maas_worker_network_sent_bytes", "Host network bytes sent"),
        )
    }
    for node, s in samples.items():
        w = [node]
        c = s.get("cpu") or {}
        if c.get("percent") is not None:
            cpu.add_metric(w, c["percent"])
        for i, pct in enumerate(c.get("per_core") or []):
            core.add_metric([node, str(i)], pct)
        m = s.get("memory") or {}
        mem.add_metric(w, m.get("used_percent", 0.0))
        avail.add_metric(w, m.get("available_bytes", 0))
        swap.add_metric(w, (s.get("swap") or {}).get("used_percent", 0.0))
        for period, value in zip(("1m", "5m", "15m"), s.get("load") or [], strict=False):
            load.add_metric([node, period], value)
        p = s.get("pool") or {}
        procs.add_metric(w, p.get("processes", 0))
        rss.add_metric(w, sum(p.get("rss_bytes") or []))
        rss_max.add_metric(w, max(p.get("rss_bytes") or [0]))
        fds.add_metric(w, sum(p.get("open_fds") or []))
        j = s.get("jobs") or {}
        if isinstance(j.get("per_s"), int | float):
            rate.add_metric(w, j["per_s"])
        if isinstance(j.get("busy_fraction"), int | float):
            busy.add_metric(w, j["busy_fraction"])
        age.add_metric(w, max(0.0, now - float(s.get("at", now))))
        for g in s.get("gpu") or []:
            gpu_util.add_metric([node, str(g["index"])], g["utilization_percent"])
            gpu_mem.add_metric([node, str(g["index"])], g["memory_used_bytes"])
        d, n = s.get("disk") or {}, s.get("net") or {}
        for name, value in (
            ("maas_worker_disk_read_bytes", d.get("read_bytes")),
            ("maas_worker_disk_written_bytes", d.get("write_bytes")),
            ("maas_worker_network_received_bytes", n.get("bytes_recv")),
            ("maas_worker_network_sent_bytes", n.get("bytes_sent")),
        ):
            if value is not None:
                io[name].add_metric(w, value)
    yield from (
        cpu,
        core,
        mem,
        avail,
        swap,
        load,
        procs,
        rss,
        rss_max,
        fds,
        rate,
        busy,
        age,
        gpu_util,
        gpu_mem,
        *io.values(),
    )


class FleetCollector:
    """What ``maas-worker metrics`` shows: the backlog, every node's sample, the fleet size."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._broker = broker_client(settings)
        self._backend = backend_client(settings)

    def collect(self) -> Iterable[Any]:
        """Families for one scrape; ``maas_fleet_up`` is 0 when Redis could not be read."""
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("maas_fleet_up", "1 if the exporter could read Redis")
        try:
            reading = read_fleet(self.settings, broker=self._broker, backend=self._backend)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily(
            "maas_queue_depth", "Jobs waiting in a priority queue", labels=["priority"]
        )
        oldest = GaugeMetricFamily(
            "maas_queue_oldest_age_seconds",
            "Age of the oldest job waiting in a priority queue",
            labels=["priority"],
        )
        total = GaugeMetricFamily(
            "maas_queue_depth_total",
            "Jobs waiting in all priority queues together (one series: KEDA's trigger)",
        )
        tenant_depth = GaugeMetricFamily(
            "maas_queue_tenant_depth",
            "Jobs a tenant has waiting in a priority queue (tenants with jobs queued)",
            labels=["priority", "tenant"],
        )
        tenant_oldest = GaugeMetricFamily(
            "maas_queue_tenant_oldest_age_seconds",
            "Age of a tenant's oldest job waiting in a priority queue",
            labels=["priority", "tenant"],
        )
        backlog = reading.backlog
        for priority, n in backlog.depth.items():
            depth.add_metric([priority], n)
            age = backlog.oldest_age_s.get(priority)
            oldest.add_metric([priority], age if age is not None else 0.0)
            for tenant, tn in backlog.tenant_depth.get(priority, {}).items():
                tenant_depth.add_metric([priority, tenant], tn)
                t_age = backlog.tenant_oldest_age_s.get(priority, {}).get(tenant)
                tenant_oldest.add_metric([priority, tenant], t_age if t_age is not None else 0.0)
        total.add_metric([], backlog.total)
        yield depth
        yield oldest
        yield total
        yield tenant_depth
        yield tenant_oldest
        yield from _sample_gauges(reading.samples, time.time())
        advice = reading.advice
        for name, text, value in (
            ("maas_fleet_nodes", "Worker nodes with a current sample", advice.current_nodes),
            (
                "maas_fleet_desired_nodes",
                "Worker nodes the backlog and throughput call for",
                advice.desired_nodes,
            ),
            (
                "maas_fleet_throughput_jobs_per_second",
                "Jobs the fleet finished per second",
                advice.throughput_jobs_per_s,
            ),
        ):
            g = GaugeMetricFamily(name, text)
            g.add_metric([], value)
            yield g
        cap = GaugeMetricFamily(
            "maas_fleet_node_capacity_jobs_per_second",
            "Measured jobs per second of one fully busy node",
        )
        if advice.node_capacity_jobs_per_s is not None:
            cap.add_metric([], advice.node_capacity_jobs_per_s)
        yield cap
