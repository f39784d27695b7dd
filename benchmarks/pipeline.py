"""Benchmark: the secure pipeline against plain Celery, in one run.

Not a test. Both run the same echo job through the same embedded Valkey
server with the same worker settings (2 pool processes, prefetch 1, late
ack): plain Celery (no crypto, Celery's own result backend) is the baseline,
measured alternately with the secure pipeline (seal -> Redis -> verify, claim,
decrypt -> seal -> write-once store -> open) so drift hits both.

Per payload size: throughput (N jobs submitted, then all results awaited),
latency p50/p99 (sequential jobs), bytes held in Redis per job, and the CPU
time each job costs the client, the worker (all its processes) and Redis
during the throughput runs. CPU time is what the pipelines cost whatever else
the machine is doing, so it compares them more steadily than jobs/s on a
shared box.

    .venv/bin/python benchmarks/pipeline.py [--repeat 3] [--jobs 2000] [--sizes 1024,65536]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis

from benchmarks.stack import cpu_s
from maas_worker.client.client import Client
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import Keyring, save_keyring


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Plain:
    """Plain Celery: a worker process and a producer app."""

    def __init__(self, url: str, log: Path) -> None:
        env = {**os.environ, "BENCH_BROKER_URL": url, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "benchmarks.plain_app",
                "worker",
                "-c",
                "2",
                "-Q",
                "plain",
                "-l",
                "WARNING",
                "-n",
                "plain@%h",
            ],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        os.environ["BENCH_BROKER_URL"] = url
        from benchmarks.plain_app import app, echo

        self.app, self.echo = app, echo
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while not self.app.control.ping(timeout=0.5):
            if time.monotonic() > deadline:
                raise RuntimeError("plain worker did not start")

    def submit(self, payload: dict[str, Any]) -> Any:
        return self.echo.apply_async(args=[payload])

    @staticmethod
    def wait(handle: Any) -> Any:
        return handle.get(timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Secure:
    """maas-worker: a worker process and a Client."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.worker = WorkerProcess(
            env=env, name="secure", log_path=log, concurrency=2, extra_args=("--celery-tasks",)
        )
        self.client = Client(settings=Settings.from_env(env))
        self.worker.start()
        self.worker.wait_ready(self.client.backend)
        assert self.worker.proc is not None
        self.pid = self.worker.proc.pid

    def submit(self, payload: dict[str, Any]) -> Any:
        return self.client.submit("echo", payload, priority="normal")

    @staticmethod
    def wait(handle: Any) -> Any:
        return handle.result(timeout=120)

    def stop(self) -> None:
        self.worker.stop()


def throughput(
    system: Any, payload: dict[str, Any], n: int, redis_pid: int
) -> tuple[float, dict[str, float]]:
    """Jobs/s, and CPU ms per job of the client, the worker and Redis."""
    parts = {
        "client": (os.getpid(), False),
        "worker": (system.pid, True),
        "redis": (redis_pid, False),
    }
    before = {k: cpu_s(pid, tree=tree) for k, (pid, tree) in parts.items()}
    t = time.perf_counter()
    handles = [system.submit(payload) for _ in range(n)]
    for h in handles:
        system.wait(h)
    elapsed = time.perf_counter() - t
    cpu = {k: (cpu_s(pid, tree=tree) - before[k]) * 1000 / n for k, (pid, tree) in parts.items()}
    return n / elapsed, cpu


def latencies(system: Any, payload: dict[str, Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        system.wait(system.submit(payload))
        out.append((time.perf_counter() - t) * 1000)
    return out


def stored_bytes(
    r: redis.Redis, before: Callable[[], None], system: Any, payload: dict[str, Any], n: int
) -> float:
    """Bytes Redis holds per finished job (results, markers), from used_memory."""
    before()
    m0 = int(r.info("memory")["used_memory"])
    handles = [system.submit(payload) for _ in range(n)]
    for h in handles:
        system.wait(h)
    return (int(r.info("memory")["used_memory"]) - m0) / n


def print_ratio(what: str, secure: list[float], plain: list[float]) -> None:
    """The secure/plain ratio of each run (same run, same machine state) and their median."""
    ratio = [s / p for s, p in zip(secure, plain, strict=True)]
    print(
        f"  secure/plain {what}: median {statistics.median(ratio):.3f} "
        f"(runs: {', '.join(f'{x:.3f}' for x in ratio)})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--sizes", default="1024,65536,1048576,8388608")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; repeat {args.repeat}"
    )
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        keyring = Path(tmp) / "keyring.json"
        save_keyring(keyring, Keyring().with_new_tenant("bench"))
        env = {
            **os.environ,
            "MAAS_BROKER_URL": server.url,
            "MAAS_KEYRING": str(keyring),
            "MAAS_TENANT": "bench",
            "MAAS_DIAGNOSTIC_MODELS": "1",
            "MAAS_MAX_QUEUE_DEPTH": "1000000",
            "MAAS_MAX_INPUT_BYTES": str(16 << 20),
            "MAAS_MAX_RESULT_BYTES": str(32 << 20),
        }
        r = redis.Redis.from_url(server.url)
        plain = Plain(server.url, Path(tmp) / "plain.log")
        secure = Secure(env, Path(tmp) / "secure.log")
        try:
            for size in sizes:
                payload = {"data": "x" * size}
                n = max(20, min(args.jobs, args.jobs * 1024 // size))
                res: dict[str, dict[str, list[float]]] = {"plain": {}, "secure": {}}
                for _ in range(args.repeat):
                    for name, system in (("plain", plain), ("secure", secure)):
                        tp, cpu = throughput(system, payload, n, server.pid)
                        lat = latencies(system, payload, max(20, n // 10))
                        row = res[name]
                        row.setdefault("jobs/s", []).append(tp)
                        for part, ms in cpu.items():
                            row.setdefault(part, []).append(ms)
                        row.setdefault("cpu", []).append(sum(cpu.values()))
                        row.setdefault("p50", []).append(pct(lat, 50))
                        row.setdefault("p99", []).append(pct(lat, 99))
                per_job = {
                    name: stored_bytes(r, lambda: None, system, payload, min(n, 200))
                    for name, system in (("plain", plain), ("secure", secure))
                }
                print(f"\npayload {size} B, {n} jobs per throughput run")
                for name in ("plain", "secure"):
                    row = res[name]
                    med = {k: statistics.median(v) for k, v in row.items()}
                    print(
                        f"  {name:<7} jobs/s {med['jobs/s']:8.1f} "
                        f"[{min(row['jobs/s']):.0f}-{max(row['jobs/s']):.0f}]  "
                        f"p50 {med['p50']:7.2f} ms  p99 {med['p99']:7.2f} ms  "
                        f"Redis {per_job[name] / 1024:8.1f} KiB/job\n"
                        f"  {name:<7} CPU ms/job: client {med['client']:.3f}, worker "
                        f"{med['worker']:.3f}, Redis {med['redis']:.3f}, total "
                        f"{med['cpu']:.3f} [{min(row['cpu']):.3f}-{max(row['cpu']):.3f}]"
                    )
                print_ratio("throughput", res["secure"]["jobs/s"], res["plain"]["jobs/s"])
                print_ratio("CPU per job", res["secure"]["cpu"], res["plain"]["cpu"])
        finally:
            plain.stop()
            secure.stop()


if __name__ == "__main__":
    main()
