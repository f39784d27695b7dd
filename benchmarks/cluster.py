"""Benchmark: end-to-end jobs/s on a Redis Cluster by number of primaries and shards (#17).

Not a test. On this machine the producer, the workers and every Redis node
share two cores: left alone, Python would be the bottleneck and no number of
Redis nodes could show. So each primary's CPU is capped (``--redis-cpu``
cores, default 0.05, with the cgroup v1 ``cpu`` controller: root only): Redis
is then the bottleneck, as one primary is at scale (docs/scaling.md,
"Capacity model"), and the question is the one an operator asks: does
throughput grow when primaries and shards are added?

Configurations (``--configs``, ``PxS``: P primaries, no replicas, S queue
shards): a cluster of P primaries, ``MAAS_REDIS_CLUSTER=1``,
``MAAS_QUEUE_SHARDS=S``; one batch-consumer worker node per shard
(``worker --shards K --concurrency 1``); ``--tenants`` tenants whose names
are chosen so that each shard gets as many; one `AsyncClient` per tenant
(one event loop) submits ``--jobs`` echo jobs in all, in chunks, and waits for
every result (opened). Time runs from the first submit to the last result.
Reported: jobs/s (median of ``--repeat`` rounds, [min-max]) and each
primary's CPU per job (``INFO cpu``).

    .venv/bin/python benchmarks/cluster.py [--configs 1x1,3x1,3x3] [--jobs 3000]
        [--repeat 3] [--redis-cpu 0.05] [--tenants 12]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis
import redis.cluster

from benchmarks.stack import bench_env
from maas_worker import AsyncClient, as_completed
from maas_worker.broker.shards import shard_of
from maas_worker.local.embedded import ClusterGroup
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import Keyring

ECHO = {"data": "x" * 1024}
CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


class CpuCap:
    """Each given process limited to ``cores`` of CPU (a cgroup v1 ``cpu`` group each)."""

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self.groups: list[Path] = []

    def limit(self, pid: int) -> None:
        if not self.cores:
            return
        group = CGROUP_ROOT / f"maas-bench-{pid}"
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(int(self.cores * PERIOD_US)))
        (group / "cgroup.procs").write_text(str(pid))
        self.groups.append(group)

    def release(self) -> None:
        for group in self.groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    (CGROUP_ROOT / "cgroup.procs").write_text(pid)
                group.rmdir()
        self.groups.clear()


def tenants_per_shard(shards: int, per_shard: int) -> list[str]:
    """Tenant names, ``per_shard`` of them on each shard (by the placement rule)."""
    names: list[str] = []
    counts = [0] * shards
    i = 0
    while min(counts) < per_shard:
        name = f"t{i}"
        k = shard_of(name, shards)
        if counts[k] < per_shard:
            counts[k] += 1
            names.append(name)
        i += 1
    return names


def redis_cpu_s(cluster: ClusterGroup) -> dict[int, float]:
    """User + system CPU seconds of each running primary, by port (``INFO cpu``)."""
    out = {}
    for node in cluster.primaries():
        with contextlib.closing(redis.Redis(host="127.0.0.1", port=node.port)) as client:
            info: Any = client.info("cpu")
        out[node.port] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return out


async def submit_and_wait(settings: dict[str, Settings], jobs: int, chunk: int) -> None:
    """Every tenant submits its share of ``jobs`` in chunks, then awaits each result."""
    per_tenant = jobs // len(settings)

    async def one(s: Settings) -> None:
        async with AsyncClient(settings=s) as client:
            submitted = []
            for start in range(0, per_tenant, chunk):
                n = min(chunk, per_tenant - start)
                submitted += await client.submit_many("echo", [ECHO] * n)
            done = 0
            async for job in as_completed(submitted, timeout=600):
                await job.result()
                done += 1
            assert done == per_tenant

    await asyncio.gather(*(one(s) for s in settings.values()))


def run_config(
    primaries: int, shards: int, args: argparse.Namespace, tmp: Path
) -> tuple[list[float], dict[int, float]]:
    """Rounds of jobs/s, and CPU ms per job of each primary (last round), for one config."""
    cap = CpuCap(args.redis_cpu)
    per_shard = max(1, args.tenants // shards)
    names = tenants_per_shard(shards, per_shard)
    keyring = Keyring()
    for name in names:
        keyring = keyring.with_new_tenant(name)
    with ClusterGroup(primaries=primaries, replicas=0) as cluster:
        for node in cluster.nodes:
            cap.limit(node.pid)
        env = bench_env(
            tmp,
            cluster.url,
            tenant=names[0],
            keyring=keyring,
            MAAS_REDIS_CLUSTER="1",
            MAAS_REDIS_CLUSTER_NODES=cluster.seeds,
            MAAS_QUEUE_SHARDS=str(shards),
        )
        backend: Any = redis.cluster.RedisCluster.from_url(cluster.url)
        workers = [
            WorkerProcess(
                env=env,
                name=f"s{k}",
                log_path=tmp / f"worker-{primaries}x{shards}-{k}.log",
                concurrency=1,
                extra_args=("--shards", str(k)),
            )
            for k in range(shards)
        ]
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.wait_ready(backend)
            settings = {n: Settings.from_env({**env, "MAAS_TENANT": n}) for n in names}
            jobs = per_shard * shards * (args.jobs // (per_shard * shards))
            asyncio.run(submit_and_wait(settings, min(jobs, 200), args.chunk))  # warm-up
            rates = []
            for _ in range(args.repeat):
                before = redis_cpu_s(cluster)
                t = time.perf_counter()
                asyncio.run(submit_and_wait(settings, jobs, args.chunk))
                rates.append(jobs / (time.perf_counter() - t))
                after = redis_cpu_s(cluster)
                cpu = {p: (after[p] - before.get(p, 0.0)) * 1000 / jobs for p in after}
            return rates, cpu
        finally:
            for w in workers:
                with contextlib.suppress(Exception):
                    w.stop(timeout_s=10)
            backend.close()
            cap.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--configs", default="1x1,3x1,3x3")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--redis-cpu", type=float, default=0.05)
    args = parser.parse_args()
    if args.redis_cpu and (os.geteuid() != 0 or not CGROUP_ROOT.is_dir()):
        print("no cgroup v1 cpu controller (or not root): primaries uncapped (--redis-cpu 0)")
        args.redis_cpu = 0.0
    print(
        f"# {platform.node()}, {os.cpu_count()} cores; each primary capped at "
        f"{args.redis_cpu:g} core(s); {args.jobs} echo jobs (1 KiB) per round, "
        f"{args.tenants} tenants, chunks of {args.chunk}"
    )
    base = None
    with tempfile.TemporaryDirectory(prefix="maas-bench-cluster-") as tmp:
        for config in args.configs.split(","):
            primaries, shards = (int(x) for x in config.split("x"))
            rates, cpu = run_config(primaries, shards, args, Path(tmp))
            median = statistics.median(rates)
            base = base or median
            spread = f"[{min(rates):.0f}-{max(rates):.0f}]"
            per_node = "  ".join(f"{ms:.3f}" for _, ms in sorted(cpu.items()))
            print(
                f"{primaries} primaries x {shards} shards: {median:7.0f} jobs/s {spread} "
                f"x{median / base:.2f}; primaries' CPU ms/job: {per_node}"
            )


if __name__ == "__main__":
    main()
