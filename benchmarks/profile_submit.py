"""Profile: where the producer's time goes in `Client.submit_many` (issue #18).

Not a test. One embedded Valkey, no worker (the jobs stay queued: the submit
path only). ``--jobs`` 1 KiB echo jobs (4,000 by default) are submitted with
`Client.submit_many` in chunks of ``--chunk`` (500) under cProfile, after one
unprofiled warm-up chunk (catalogue, connections, the Celery app). Prints the
wall time and jobs/s without and with the profiler, the functions by own time
(``--top``) and the own time summed by library (celery/kombu, redis-py,
json/base64, crypto, maas_worker, the rest), which is the budget the
docs/benchmarks.md section "Throughput" quotes.

    .venv/bin/python benchmarks/profile_submit.py [--jobs 4000] [--chunk 500] [--top 25]
        [--out submit.prof]

For a sampling profile of the same loop (no cProfile overhead) run it under
py-spy with ``--no-cprofile``::

    py-spy record -r 500 -o submit.svg -- .venv/bin/python benchmarks/profile_submit.py \
        --no-cprofile --jobs 20000
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stack import bench_env
from maas_worker import Client
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.settings import Settings

#: The input of a 1 KiB echo job (its JSON is 1,035 bytes).
PAYLOAD = {"data": "x" * 1024}

#: Library of a profiled function, by the path of its file (first match wins).
LIBRARIES = [
    ("celery/kombu", ("/celery/", "/kombu/", "/vine/", "/amqp/", "/billiard/")),
    ("redis-py", ("/redis/",)),
    ("crypto", ("/cryptography/", "/Crypto/", "maas_worker/crypto/")),
    ("maas_worker", ("maas_worker/",)),
    ("json/base64/uuid (stdlib)", ("/json/", "base64", "uuid")),
]


def library(filename: str, name: str) -> str:
    """Which bucket a profiled function's own time goes to."""
    for lib, marks in LIBRARIES:
        if any(m in filename for m in marks):
            return lib
    if filename == "~":  # a builtin: name it by what it is
        for lib, marks in (
            ("json/base64/uuid (stdlib)", ("json", "binascii", "b64", "urandom")),
            ("redis-py", ("socket", "recv", "sendall")),
            ("crypto", ("openssl", "hmac", "_hashlib")),
        ):
            if any(m in name for m in marks):
                return lib
    return "other (stdlib, builtins)"


def setup(tmp: Path, server: EmbeddedRedis, jobs: int) -> Settings:
    """Settings of a client of tenant ``acme`` on ``server`` (queue room for ``jobs``)."""
    env = bench_env(
        tmp,
        server.url,
        MAAS_MODEL_DIR=str(tmp / "models"),
        MAAS_MAX_QUEUE_DEPTH=str(jobs * 4),
    )
    return Settings.from_env(env)


def submit_all(client: Client, jobs: int, chunk: int) -> float:
    """Submit ``jobs`` echo jobs in chunks; the wall time in seconds."""
    t0 = time.perf_counter()
    for start in range(0, jobs, chunk):
        client.submit_many("echo", [PAYLOAD] * min(chunk, jobs - start))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--top", type=int, default=25, help="functions listed by own time")
    ap.add_argument("--out", help="also write the cProfile stats to this file")
    ap.add_argument("--no-cprofile", action="store_true", help="time only (for py-spy)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        settings = setup(Path(tmp), server, args.jobs)
        with Client(settings=settings) as client:
            submit_all(client, args.chunk, args.chunk)  # warm-up: catalogue, connections
            wall = submit_all(client, args.jobs, args.chunk)
            print(
                f"unprofiled: {args.jobs} jobs in {wall:.3f} s: {args.jobs / wall:.0f} jobs/s, "
                f"{wall / args.jobs * 1e6:.1f} us/job"
            )
            if args.no_cprofile:
                return
            prof = cProfile.Profile()
            prof.enable()
            wall = submit_all(client, args.jobs, args.chunk)
            prof.disable()
    print(f"under cProfile: {args.jobs / wall:.0f} jobs/s, {wall / args.jobs * 1e6:.1f} us/job")
    stats = pstats.Stats(prof)
    if args.out:
        stats.dump_stats(args.out)
    own: dict[str, float] = defaultdict(float)
    total = 0.0
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in raw.items():
        own[library(filename, name)] += tt
        total += tt
    print(f"\nown time by library (total {total:.3f} s, {total / args.jobs * 1e6:.1f} us/job):")
    for lib, tt in sorted(own.items(), key=lambda kv: -kv[1]):
        print(f"  {lib:28s} {tt / args.jobs * 1e6:7.1f} us/job  {tt / total:6.1%}")
    print()
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
