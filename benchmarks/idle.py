"""Benchmark: what an idle worker node costs Redis, per worker mode and concurrency.

Not a test. One embedded Valkey, one worker node at a time, no job queued: after
the node is ready and has settled (``--settle`` seconds), the server's command
counters are reset (``CONFIG RESETSTAT``) and read again ``--seconds`` later
(``INFO commandstats``, which counts the commands inside scripts under their
own names too); the table gives commands per second by name, and the bytes the
server received per second (``INFO stats`` ``total_net_input_bytes``: an
``EVAL`` that carries its script text shows there).

    .venv/bin/python benchmarks/idle.py [--seconds 20] [--settle 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stack import bench_env
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess

MODES = [
    ("celery", 2, ("--celery-tasks",)),
    ("celery", 8, ("--celery-tasks",)),
    ("batch consumer", 2, ()),
    ("batch consumer", 8, ()),
]


def idle_rates(
    server: EmbeddedRedis,
    tmp: Path,
    concurrency: int,
    args: tuple[str, ...],
    seconds: float,
    settle: float,
) -> tuple[dict[str, float], float]:
    """Commands per second by name and bytes in per second of one idle node."""
    env = bench_env(
        tmp,
        server.url,
        MAAS_MODEL_DIR=str(tmp / "models"),
        MAAS_METRICS_PORT="0",
    )
    r = redis.Redis.from_url(server.url)
    worker = WorkerProcess(
        env=env, name="idle", log_path=tmp / "worker.log", concurrency=concurrency, extra_args=args
    )
    worker.start()
    try:
        worker.wait_ready(r)
        time.sleep(settle)
        r.config_resetstat()
        bytes_before = int(r.info("stats")["total_net_input_bytes"])
        time.sleep(seconds)
        stats = r.info("commandstats")
        bytes_in = int(r.info("stats")["total_net_input_bytes"]) - bytes_before
    finally:
        worker.stop()
        r.close()
    # Our own reads (INFO, CONFIG) are not the node's.
    rates = {
        name.removeprefix("cmdstat_"): v["calls"] / seconds
        for name, v in stats.items()
        if name not in ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_config")
    }
    return rates, bytes_in / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=5.0)
    a = ap.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores; {a.seconds:g} s idle each")
    print("| node | concurrency | commands/s | bytes in/s | busiest commands (per s) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for mode, conc, args in MODES:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
            rates, bytes_s = idle_rates(server, Path(tmp), conc, args, a.seconds, a.settle)
        top = sorted(rates.items(), key=lambda kv: -kv[1])[:6]
        detail = ", ".join(f"{n} {v:.1f}" for n, v in top)
        print(f"| {mode} | {conc} | {sum(rates.values()):.1f} | {bytes_s:.0f} | {detail} |")


if __name__ == "__main__":
    main()
