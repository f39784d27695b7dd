"""Benchmark: a batch's claims and stores, one script call per job against one per batch (#18).

Not a test. One embedded Valkey, nothing else on it. Each round claims and then
stores ``--batch`` fresh jobs (1 KiB sealed results, no quota) twice, in turn:

* ``per-job``: what the batch consumer sent before, one ``EVALSHA`` of
  claim.lua and one of store.lua per job, each stage in one pipeline
  (`scripts.eval_many`);
* ``batch``: `JobGuard.claim_many` and `JobGuard.store_many`, one ``EVALSHA``
  of claim_batch.lua and one of store_batch.lua per batch.

Reported, per job, medians over the rounds: the client's CPU (redis-py packing
the commands and parsing the replies, the guard's own Python), the wall time
of the two round trips, and Valkey's time in ``evalsha`` (``INFO
commandstats``, the scripts and the commands they run).

    .venv/bin/python benchmarks/batch_scripts.py [--batch 64] [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maas_worker.backend import keyspace, scripts
from maas_worker.backend.claims import ClaimRequest, JobGuard, _store_call
from maas_worker.local.embedded import EmbeddedRedis

TENANT = "acme"
WINDOW_MS = 120_000
RESULT_TTL_S = 3600


def _evalsha_us(r: redis.Redis) -> float:
    stats: dict[str, Any] = r.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0))


def per_job(guard: JobGuard, r: redis.Redis, jobs: list[str], sealed: bytes) -> None:
    """The batch consumer before: claim.lua and store.lua once a job, each stage one pipeline."""
    claim, store = scripts.register(r, "claim"), scripts.register(r, "store")
    calls = []
    for j in jobs:
        calls.append(
            (
                [
                    keyspace.claim(TENANT, j),
                    keyspace.result(TENANT, j),
                    keyspace.attempts(TENANT, j),
                    keyspace.cancel(TENANT, j),
                ],
                [guard.holder, guard.lease_ms, WINDOW_MS, guard.max_attempts, "0"],
            )
        )
    replies = scripts.eval_many(r, claim, calls)
    assert all(reply[0] == b"claimed" for reply in replies)
    stored = scripts.eval_many(
        r, store, [_store_call(TENANT, j, sealed, WINDOW_MS, RESULT_TTL_S) for j in jobs]
    )
    assert stored == [1] * len(jobs)


def batched(guard: JobGuard, r: redis.Redis, jobs: list[str], sealed: bytes) -> None:
    """The batch consumer now: one claim_batch.lua and one store_batch.lua a batch."""
    claims = guard.claim_many([ClaimRequest(TENANT, j, WINDOW_MS) for j in jobs])
    assert all(c.outcome == "claimed" for c in claims)
    stored = guard.store_many(
        [(TENANT, j, sealed, WINDOW_MS) for j in jobs], result_ttl_s=RESULT_TTL_S
    )
    assert stored == [True] * len(jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=200)
    opts = ap.parse_args()
    sealed = b"s" * 1024
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        guard = JobGuard(r, lease_s=15, holder="bench")
        ways = {"per-job": per_job, "batch": batched}
        figures: dict[str, dict[str, list[float]]] = {
            name: {"cpu": [], "wall": [], "redis": []} for name in ways
        }
        for n in range(opts.rounds + 5):
            for name, run in ways.items():
                jobs = [str(uuid.uuid4()) for _ in range(opts.batch)]
                before_us = _evalsha_us(r)
                cpu, wall = time.process_time(), time.perf_counter()
                run(guard, r, jobs, sealed)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                redis_us = _evalsha_us(r) - before_us
                if n >= 5:  # warm-up rounds: scripts loaded, connections open
                    figures[name]["cpu"].append(cpu * 1e6 / opts.batch)
                    figures[name]["wall"].append(wall * 1e6 / opts.batch)
                    figures[name]["redis"].append(redis_us / opts.batch)
            if n % 50 == 0:
                r.flushdb()
        print(f"{opts.rounds} rounds of {opts.batch} jobs (claim then store), medians per job:")
        print("| way | client CPU us | wall us (2 round trips) | Valkey evalsha us |")
        print("| --- | ---: | ---: | ---: |")
        for name, f in figures.items():
            print(
                f"| {name} | {statistics.median(f['cpu']):.1f} | "
                f"{statistics.median(f['wall']):.1f} | {statistics.median(f['redis']):.1f} |"
            )


if __name__ == "__main__":
    main()
