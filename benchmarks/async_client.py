"""Benchmark: N concurrent awaits with `AsyncClient` against `Client` with threads.

Not a test. One run, one embedded Valkey, one worker (batch consumer, two
processes) serving ``echo``; the two clients take turns on the same stack:

* async: one event loop; ``submit_many`` in chunks of 500, then every job
  awaited at once (``asyncio.gather`` of N ``job.result()`` coroutines);
* sync + threads: ``Client.submit_many`` in the same chunks, then the jobs
  waited on by a pool of ``--threads`` threads (``job.result()`` each: one
  blocking ``BLPOP`` per job at a time, one connection per thread). Not N
  threads: each holds a connection while it waits (a client opens up to
  1,024, then makes threads wait for one: backend/redis.py).

For each: wall time from the first submit to the last result, the client
process's CPU time, its threads at the peak, the Redis commands its own
connections sent per job (``CLIENT LIST`` ``tot-cmds``: submit and wait,
pipelined commands counted one by one) and, with ``--heap``, its peak Python
heap (tracemalloc).

    .venv/bin/python benchmarks/async_client.py [--jobs 10000] [--threads 64] [--heap]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stack import bench_env
from maas_worker import AsyncClient, Client
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings

CHUNK = 500
NAME = "maas-bench-client"


@dataclass
class Figures:
    wall_s: float
    cpu_s: float
    heap_peak_mib: float
    threads: int
    commands_per_job: float


def _commands(r: redis.Redis) -> int:
    total = 0
    listing: bytes = r.execute_command("CLIENT", "LIST")  # type: ignore[no-untyped-call]
    for line in listing.decode().splitlines():
        fields = dict(f.split("=", 1) for f in line.split(" ") if "=" in f)
        if fields.get("name") == NAME:
            total += int(fields["tot-cmds"])
    return total


def _measure(
    n: int, r: redis.Redis, body: Callable[[Callable[[], None]], int], heap: bool
) -> Figures:
    """Run ``body`` and take the figures. ``body`` calls its argument while it waits (the
    thread count is sampled there) and returns `_commands` read before its client closed
    (a closed connection leaves ``CLIENT LIST``)."""
    threads = [threading.active_count()]
    if heap:
        tracemalloc.start()
    cpu0, commands0 = resource.getrusage(resource.RUSAGE_SELF), _commands(r)
    t0 = time.perf_counter()
    commands1 = body(lambda: threads.append(threading.active_count()))
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = float("nan")
    if heap:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return Figures(
        wall,
        (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        peak,
        max(threads),
        (commands1 - commands0) / n,
    )


def run_async(settings: Settings, n: int, r: redis.Redis, heap: bool) -> Figures:
    def body(sample: Callable[[], None]) -> int:
        async def main() -> int:
            async with AsyncClient(settings=settings) as client:
                for conn in (client.backend, client.broker):
                    conn.connection_pool.connection_kwargs["client_name"] = NAME
                jobs = []
                for start in range(0, n, CHUNK):
                    inputs = [{"i": i} for i in range(start, min(n, start + CHUNK))]
                    jobs += await client.submit_many("echo", inputs)

                async def sampler() -> None:
                    while True:
                        sample()
                        await asyncio.sleep(0.1)

                watch = asyncio.create_task(sampler())
                outputs = await asyncio.gather(*(j.result(timeout=600) for j in jobs))
                watch.cancel()
                assert [o["echo"]["i"] for o in outputs] == list(range(n))
                return _commands(r)

        return asyncio.run(main())

    return _measure(n, r, body, heap)


def run_threads(settings: Settings, n: int, r: redis.Redis, threads: int, heap: bool) -> Figures:
    def body(sample: Callable[[], None]) -> int:
        with Client(settings=settings) as client:
            for conn in (client.backend, client.broker):
                conn.connection_pool.connection_kwargs["client_name"] = NAME
            jobs = []
            for start in range(0, n, CHUNK):
                inputs = [{"i": i} for i in range(start, min(n, start + CHUNK))]
                jobs += client.submit_many("echo", inputs)

            def wait(job: Any) -> int:
                sample()
                return int(job.result(timeout=600)["echo"]["i"])

            with ThreadPoolExecutor(max_workers=threads) as pool:
                assert list(pool.map(wait, jobs)) == list(range(n))
            return _commands(r)

    return _measure(n, r, body, heap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    # Each waiting thread holds a connection (a client opens up to 1,024).
    ap.add_argument("--threads", type=int, default=64, help="the sync client's waiting threads")
    ap.add_argument(
        "--heap",
        action="store_true",
        help="trace the Python heap's peak (tracemalloc: slows both clients, so the times "
        "of such a run are not comparable with a run without it)",
    )
    args = ap.parse_args()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {args.jobs} jobs each"
    )
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        env = bench_env(
            Path(tmp),
            server.url,
            MAAS_MODEL_DIR=str(Path(tmp) / "models"),
            MAAS_MAX_QUEUE_DEPTH=str(args.jobs * 2),
        )
        settings = Settings.from_env(env)
        r = redis.Redis.from_url(server.url)
        worker = WorkerProcess(
            env=env,
            name="bench",
            log_path=Path(tmp) / "worker.log",
            concurrency=2,  # batch consumers (the default mode)
        )
        worker.start()
        try:
            worker.wait_ready(r)
            rows = [
                ("async, one event loop", run_async(settings, args.jobs, r, args.heap)),
                (
                    f"sync, {args.threads} threads",
                    run_threads(settings, args.jobs, r, args.threads, args.heap),
                ),
            ]
        finally:
            worker.stop()
    print(
        "| client | wall s | jobs/s | client CPU s | peak Python heap MiB "
        "| threads at peak | Redis commands/job |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, f in rows:
        print(
            f"| {name} | {f.wall_s:.1f} | {args.jobs / f.wall_s:.0f} | {f.cpu_s:.1f} "
            f"| {f.heap_peak_mib:.1f} | {f.threads} | {f.commands_per_job:.2f} |"
        )


if __name__ == "__main__":
    main()
