"""Benchmark: batching digits jobs vs one job per model call.

Not a test. One run, same embedded Valkey, alternating the worker setups:

* baseline: ``worker --celery-tasks``, prefork pool, 2 processes, one model call per job;
* batched model calls: threads pool, 32 threads, ``MAAS_BATCH=digits=32:5``
  (up to 32 jobs per model call, waiting at most 5 ms for more);
* batch consumer: ``worker --concurrency 2`` (the default mode; up to
  ``MAAS_CONSUMER_BATCH`` jobs per batch: one round trip per pipeline stage
  and one model call per batch).

Each job is one 64-pixel sample, submitted with `Client.submit_many` in
chunks of 200; every job is still sealed, claimed, stored and acknowledged on
its own. Reports jobs/s and sequential single-job latency p50/p99: medians of
the runs, with their spread.

    .venv/bin/python benchmarks/batching.py [--repeat 3] [--jobs 3000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maas_worker.client.client import Client
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import Keyring, save_keyring
from tests.modelkit import holdout


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(client: Client, samples: list[list[int]], n: int) -> float:
    t = time.perf_counter()
    jobs = []
    for start in range(0, n, 200):
        chunk = [{"inputs": [samples[i % len(samples)]]} for i in range(start, min(n, start + 200))]
        jobs += client.submit_many("digits", chunk)
    for job in jobs:
        job.result(timeout=300)
    return n / (time.perf_counter() - t)


def latency(client: Client, samples: list[list[int]], n: int) -> tuple[float, float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        client.submit("digits", {"inputs": [samples[i % len(samples)]]}).result(timeout=60)
        out.append((time.perf_counter() - t) * 1000)
    return pct(out, 50), pct(out, 99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument(
        "--latency-jobs", type=int, default=200, help="sequential jobs for the latency figures"
    )
    args = ap.parse_args()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    samples = holdout()["inputs"]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        keyring = Path(tmp) / "keyring.json"
        save_keyring(keyring, Keyring().with_new_tenant("bench"))
        env = {
            **os.environ,
            "MAAS_BROKER_URL": server.url,
            "MAAS_KEYRING": str(keyring),
            "MAAS_TENANT": "bench",
            "MAAS_MAX_QUEUE_DEPTH": "1000000",
            "MAAS_METRICS_PORT": "0",
        }
        env.pop("MAAS_MODEL_DIR", None)  # the bundled, signed digits
        client = Client(settings=Settings.from_env(env))
        setups = {
            "one-per-call (prefork x2)": (("--celery-tasks",), 2, {}),
            "batched calls (threads x32, digits=32:5)": (
                ("--pool", "threads"),
                32,
                {"MAAS_BATCH": "digits=32:5"},
            ),
            "batch consumer (x2, batch 64)": (
                (),
                2,
                {"MAAS_CONSUMER_BATCH": "64"},
            ),
        }
        results: dict[str, list[float]] = {name: [] for name in setups}
        lat: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
        for rep in range(args.repeat):
            for name, (extra, conc, more) in setups.items():
                w = WorkerProcess(
                    env={**env, **more},
                    name="b",
                    log_path=Path(tmp) / "w.log",
                    concurrency=conc,
                    extra_args=extra,
                )
                w.start()
                try:
                    w.wait_ready(client.backend)
                    run(client, samples, 200)  # warm-up: models loaded, connections open
                    results[name].append(run(client, samples, args.jobs))
                    lat[name].append(latency(client, samples, args.latency_jobs))
                finally:
                    w.stop()
                print(
                    f"  run {rep + 1}: {name:<42} {results[name][-1]:7.1f} jobs/s  "
                    f"p50 {lat[name][-1][0]:.2f} ms p99 {lat[name][-1][1]:.2f} ms",
                    flush=True,
                )
    base = statistics.median(results["one-per-call (prefork x2)"])
    print(f"\ndigits, {args.jobs} jobs per run, {args.repeat} runs (median [min-max])")
    for name, values in results.items():
        p50s = [x[0] for x in lat[name]]
        p99s = [x[1] for x in lat[name]]
        print(
            f"  {name:<42} {statistics.median(values):7.1f} jobs/s "
            f"[{min(values):.0f}-{max(values):.0f}]  x{statistics.median(values) / base:.2f}  "
            f"latency p50 {statistics.median(p50s):.2f} ms [{min(p50s):.2f}-{max(p50s):.2f}] "
            f"p99 {statistics.median(p99s):.2f} ms [{min(p99s):.2f}-{max(p99s):.2f}]"
        )


if __name__ == "__main__":
    main()
