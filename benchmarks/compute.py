"""Benchmark: priority latency under backlog, and the cost of quotas.

Not a test: prints medians (and spread) of repeated measurements taken in ONE
run, so every figure is compared with a baseline from the same minute on the
same (shared, noisy) machine.

1. High-job latency (submit -> result in hand), p50 and p99:
   idle system vs behind a backlog of 2,000 low jobs (each a 20 ms `sleep`),
   one worker with 2 pool processes. Baseline: the idle figure.
2. Quota cost per job: the worker's claim script with the quota charge
   (token bucket and in-flight set, `JobGuard.claim_job` with an admission)
   and without it, the client's advisory check (`Quotas.advise_many`, one
   job), each vs a plain Redis round trip (PING) on the same connection; and
   end-to-end `Client.submit` for a tenant with and without quotas.

    .venv/bin/python benchmarks/compute.py [--repeat 3] [--backlog 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maas_worker.backend.claims import JobGuard
from maas_worker.client.client import Client
from maas_worker.crypto.envelope import now_ms
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import Keyring, TenantPolicy, save_keyring
from maas_worker.tenancy.quota import Quotas, admission_args, admission_keys


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def high_latencies(client: Client, n: int, gap_s: float) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        client.submit("echo", {"p": "high"}, priority="high").result(timeout=120)
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(gap_s)
    return out


Rows = dict[str, list[tuple[float, float]]]


def bench_priority(client: Client, backlog: int, repeat: int) -> Rows:
    rows: Rows = {"idle": [], "backlog": []}
    for _ in range(repeat):
        lat = high_latencies(client, 40, 0.02)
        rows["idle"].append((pct(lat, 50), pct(lat, 99)))
        for _ in range(backlog):
            client.submit("sleep", {"seconds": 0.02}, priority="low")
        lat = high_latencies(client, 40, 0.02)
        left = int(client.broker.llen(client.depth_key("low")))
        rows["backlog"].append((pct(lat, 50), pct(lat, 99)))
        print(f"  run: low jobs still queued after the high probes: {left}", flush=True)
        while client.broker.llen(client.depth_key("low")):  # drain before the next repetition
            time.sleep(0.5)
    return rows


def bench_quota(settings: Settings, repeat: int, n: int) -> dict[str, list[float]]:
    client = Client(settings=settings)
    quotas = Quotas(client.backend)
    guard = JobGuard(client.backend, lease_s=60)
    policy = TenantPolicy(rate_per_s=1e9, burst=10**9, max_in_flight=10**9)
    out: dict[str, list[float]] = {
        "ping": [],
        "claim_plain": [],
        "claim_quota": [],
        "advise": [],
        "submit_plain": [],
        "submit_quota": [],
    }
    metered = Client(
        settings=Settings.from_env(
            {
                **os.environ,
                "MAAS_TENANT": "metered",
                "MAAS_KEYRING": str(settings.keyring_path),
                "MAAS_BROKER_URL": settings.broker_url,
                "MAAS_DIAGNOSTIC_MODELS": "1",
            }
        )
    )
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            client.backend.ping()
        out["ping"].append((time.perf_counter() - t) / n * 1e6)
        exp = now_ms() + 3_600_000
        for name, charged in (("claim_plain", False), ("claim_quota", True)):
            ids = [str(uuid.uuid4()) for _ in range(n)]
            t = time.perf_counter()
            for job_id in ids:
                admission = (
                    (admission_keys("bench"), admission_args(job_id, policy, exp))
                    if charged
                    else None
                )
                guard.claim_job("bench", job_id, window_ms=3_600_000, admission=admission)
            out[name].append((time.perf_counter() - t) / n * 1e6)
        t = time.perf_counter()
        for _ in range(n):
            quotas.advise_many("bench", [str(uuid.uuid4())], policy, exp)
        out["advise"].append((time.perf_counter() - t) / n * 1e6)
        for name, c in (("submit_plain", client), ("submit_quota", metered)):
            t = time.perf_counter()
            for _ in range(n):
                c.submit("echo", {"x": 1}, priority="low")
            out[name].append((time.perf_counter() - t) / n * 1e6)
            c.broker.delete(c.depth_key("low"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backlog", type=int, default=2000)
    args = ap.parse_args()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        keyring = Path(tmp) / "keyring.json"
        ring = (
            Keyring()
            .with_new_tenant("acme")
            .with_new_tenant(
                "metered", TenantPolicy(rate_per_s=1e9, burst=10**9, max_in_flight=10**9)
            )
        )
        save_keyring(keyring, ring)
        env = {
            **os.environ,
            "MAAS_BROKER_URL": server.url,
            "MAAS_KEYRING": str(keyring),
            "MAAS_TENANT": "acme",
            "MAAS_DIAGNOSTIC_MODELS": "1",
            "MAAS_MAX_QUEUE_DEPTH": "1000000",
        }
        settings = Settings.from_env(env)
        quota = bench_quota(settings, args.repeat, 2000)
        print("\nquota cost, us per job (median of runs [min-max]):")
        for name, values in quota.items():
            print(
                f"  {name:<13} {statistics.median(values):8.1f}  "
                f"[{min(values):.1f}-{max(values):.1f}]"
            )
        base = statistics.median(quota["ping"])
        ratio = statistics.median(quota["submit_quota"]) / statistics.median(quota["submit_plain"])
        charge = statistics.median(quota["claim_quota"]) - statistics.median(quota["claim_plain"])
        print(
            f"  quota charge in the claim / ping = {charge / base:.2f}; "
            f"advise / ping = {statistics.median(quota['advise']) / base:.2f}; "
            f"submit with quota / without = {ratio:.2f}"
        )
        worker = WorkerProcess(
            env=env,
            name="bench",
            log_path=Path(tmp) / "w.log",
            concurrency=2,
            extra_args=("--celery-tasks",),
        )
        worker.start()
        try:
            worker.wait_ready(Client(settings=settings).backend)
            rows = bench_priority(Client(settings=settings), args.backlog, args.repeat)
        finally:
            worker.stop()
    print(f"\nhigh-job latency, ms (median over {args.repeat} runs of 40 probes):")
    idle50 = statistics.median(r[0] for r in rows["idle"])
    for name, runs in rows.items():
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        spread = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in runs)
        print(
            f"  {name:<8} p50 {p50:7.1f}  p99 {p99:7.1f}   p50/idle p50 = {p50 / idle50:.2f}"
            f"   runs (p50/p99): {spread}"
        )


if __name__ == "__main__":
    main()
