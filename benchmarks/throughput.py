"""Benchmark: end-to-end jobs/s of sealed jobs against plain Celery's best, in one run (#18).

Not a test. One embedded Valkey; the producer (this process), Valkey and the
worker share the machine. A run submits ``--jobs`` jobs and waits for every
result; the time runs from the first submit to the last result in hand.

* secure: `AsyncClient.submit_many` in chunks of ``--chunk`` (one event loop),
  every job sealed, verified, claimed once, decrypted, run, sealed again and
  stored write-once; results awaited with `as_completed` (one read per batch
  of jobs) and opened. Per worker mode: ``batch`` (``worker --concurrency 2``,
  the batch consumer, the default) and ``perjob`` (``worker --celery-tasks
  --concurrency 2``, one Celery task per job).
* plain: plain Celery (benchmarks/plain_app.py), no crypto, the same echo job:
  its best configuration found here, a ``group`` of the tasks published on
  one producer, prefetch multiplier ``--plain-prefetch`` (16), results read
  with ``join_native`` (Celery's batched read of its Redis backend), the
  same worker (prefork, 2 processes), late ack.

Plain Celery stays up for the whole run (it polls its own queue only); each
secure mode runs its ``--repeat`` rounds alternating with a plain run, so each
ratio compares runs a few seconds apart. Reported: medians of the rounds with
[min-max], and the CPU each job cost the producer, the worker (all its
processes) and Valkey (psutil; sums of user and system time).

    .venv/bin/python benchmarks/throughput.py [--jobs 4000] [--repeat 3]
        [--modes batch,perjob] [--model echo|digits]

``--profile DIR`` also profiles the secure runs: the producer with cProfile
(``DIR/producer-<mode>.prof``, summarised by library as
benchmarks/profile_submit.py does), the worker with py-spy (in the ``dev``
extra; one ``py-spy record --format raw`` per process of the worker,
``DIR/worker-<mode>-<pid>.txt``, summarised by process, library, stage of the
batch consumer and function). Profiled runs are slower: quote the figures of a run without it.

``--model digits`` runs the bundled digits model (one 8x8 sample per job) in
the secure modes; plain Celery has no digits task, so its echo rate stays the
reference.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil
import redis

from benchmarks.profile_submit import library
from benchmarks.stack import bench_env, cpu_s
from maas_worker import AsyncClient, as_completed
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings

ECHO = {"data": "x" * 1024}
MODES: dict[str, tuple[str, ...]] = {
    "batch": (),
    "perjob": ("--celery-tasks",),
}


class PlainCelery:
    """Plain Celery's worker and producer app, on ``url``."""

    def __init__(self, url: str, log: Path, prefetch: int) -> None:
        env = {
            **os.environ,
            "BENCH_BROKER_URL": url,
            "BENCH_PREFETCH": str(prefetch),
            "PYTHONPATH": str(ROOT),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.plain_app", "worker",
             "-c", "2", "-Q", "plain", "-l", "WARNING", "-n", "plain@%h"],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        os.environ["BENCH_BROKER_URL"] = url
        from benchmarks.plain_app import app, echo

        self.app, self.echo = app, echo
        deadline = time.monotonic() + 60
        while not self.app.control.ping(timeout=0.5):
            if time.monotonic() > deadline:
                raise RuntimeError("plain worker did not start")

    def run(self, n: int) -> None:
        from celery import group

        result = group(self.echo.s(ECHO) for _ in range(n)).apply_async()
        outputs = result.join_native(timeout=300)
        assert len(outputs) == n and outputs[0] == {"echo": ECHO}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def digits_inputs(n: int) -> list[dict[str, Any]]:
    """``n`` digits jobs of one 8x8 sample each (pixel values 0-16)."""
    return [{"inputs": [[(i + j) % 17 for j in range(64)]]} for i in range(n)]


def secure_run(settings: Settings, model: str, n: int, chunk: int) -> None:
    async def main() -> None:
        inputs = [ECHO] * n if model == "echo" else digits_inputs(n)
        async with AsyncClient(settings=settings) as client:
            jobs = []
            for start in range(0, n, chunk):
                jobs += await client.submit_many(model, inputs[start : start + chunk])
            done = 0
            async for job in as_completed(jobs, timeout=300):
                await job.result()  # opened: verified and bound to its request
                done += 1
            assert done == n

    asyncio.run(main())


def measure(
    run: Callable[[], None], n: int, pids: dict[str, int]
) -> tuple[float, dict[str, float]]:
    """Jobs/s of ``run`` and its CPU ms per job by process (worker: with its children)."""
    before = {k: cpu_s(pid, tree=k == "worker") for k, pid in pids.items()}
    t = time.perf_counter()
    run()
    elapsed = time.perf_counter() - t
    cpu = {k: (cpu_s(pid, tree=k == "worker") - before[k]) * 1000 / n for k, pid in pids.items()}
    return n / elapsed, cpu


def print_producer_profile(prof: cProfile.Profile, jobs: int, out: Path) -> None:
    """The producer's own time per job by library (and the stats file)."""
    stats = pstats.Stats(prof)
    stats.dump_stats(out)
    own: Counter[str] = Counter()
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in raw.items():
        own[library(filename, name)] += tt
    total = sum(own.values())
    print(f"  producer under cProfile: {total / jobs * 1e6:.1f} us/job own time ({out})")
    for lib, tt in own.most_common():
        print(f"    {lib:28s} {tt / jobs * 1e6:7.1f} us/job  {tt / total:6.1%}")
    stats.sort_stats("tottime").print_stats(12)


def print_spy_profile(paths: list[Path], top: int = 30) -> None:
    """py-spy raw profiles (collapsed stacks, one file per process): the share of
    samples by process, by library of the leaf frame, and the leaf functions.

    Idle frames (waiting on a socket, a lock or a sleep) are counted apart:
    py-spy records them when it cannot tell a thread is idle."""
    by_lib: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    procs: Counter[str] = Counter()
    total = idle = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            leaf = stack.split(";")[-1]
            func, _, where = leaf.partition(" (")
            if any(w in leaf for w in IDLE_LEAVES):
                idle += n
                continue
            by_lib[library(where.rsplit(":", 1)[0], func)] += n
            by_stage[stage(stack)] += n
            leaves[leaf] += n
            procs[path.stem] += n
            total += n
    if not total:
        print("  worker: no samples")
        return
    print(f"  worker under py-spy: {total} busy samples ({idle} idle left out)")
    for proc, n in procs.most_common():
        print(f"    {proc}: {n / total:6.1%}")
    for lib, n in by_lib.most_common():
        print(f"    {lib:28s} {n / total:6.1%}")
    print("  by stage (the first that the stack is in):")
    for name, n in by_stage.most_common():
        print(f"    {name:44s} {n / total:6.1%}")
    for leaf, n in leaves.most_common(top):
        print(f"    {n / total:6.1%}  {leaf[:150]}")


#: A batch consumer's stages, by a frame a sample's stack holds (first match wins).
STAGES = [
    ("task events", ("TaskEvents", "EventDispatcher", "celery/events/")),
    ("metrics", ("prometheus_client", "monitoring/metrics.py")),
    ("redis-py (pack, send, parse: every pipeline)", ("redis/",)),
    ("entry checks (parse, check, decode)", ("BatchConsumer._open",)),
    ("verify, decrypt (authenticate, prepare)", ("_authenticate", "BatchConsumer._prepare")),
    ("model run", ("_run_models",)),
    ("seal and store results (but Redis)", ("BatchConsumer._store",)),
    ("logging", ("logging/",)),
]


def stage(stack: str) -> str:
    """The stage a py-spy stack (frames joined by ``;``) belongs to."""
    for name, marks in STAGES:
        if any(m in stack for m in marks):
            return name
    return "other"


#: Leaf frames of a thread that waits (py-spy --nonblocking cannot always tell).
IDLE_LEAVES = (
    "_read_from_socket",
    "Condition.wait",
    "_epoll.poll",
    "select (selectors.py",
    "Watchdog._loop",
    "sleep",
    "readinto (socket.py",
)


def add_commandstats(into: Counter[str], r: redis.Redis) -> None:
    """Add the server's ``INFO commandstats`` (calls and microseconds by command) to
    ``into`` as ``<command>:calls`` and ``<command>:usec``."""
    stats: dict[str, Any] = r.info("commandstats")
    for name, row in stats.items():
        command = name.removeprefix("cmdstat_")
        into[command + ":calls"] += int(row["calls"])
        into[command + ":usec"] += int(row["usec"])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def cpu_summary(cpus: list[dict[str, float]]) -> str:
    parts = {k: statistics.median(c[k] for c in cpus) for k in cpus[0]}
    total = statistics.median(sum(c.values()) for c in cpus)
    inner = " + ".join(f"{v:.3f}" for v in parts.values())
    return f"{total:.3f} ({inner})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--modes", default="batch,perjob")
    ap.add_argument("--model", choices=("echo", "digits"), default="echo")
    ap.add_argument("--plain-prefetch", type=int, default=16)
    ap.add_argument("--profile", type=Path, help="profile the secure runs into this folder")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {args.jobs} {args.model} jobs a run, "
        f"chunks of {args.chunk}, {args.repeat} rounds"
    )
    rows: dict[str, list[tuple[float, dict[str, float]]]] = {}
    ratios: dict[str, list[float]] = {}
    #: Per mode: Redis commands run and server microseconds, by command (secure runs).
    redis_work: dict[str, Counter[str]] = {}
    with tempfile.TemporaryDirectory() as tmp_name, EmbeddedRedis() as server:
        tmp = Path(tmp_name)
        env = bench_env(
            tmp,
            server.url,
            MAAS_MAX_QUEUE_DEPTH=str(args.jobs * 4),
            MAAS_CONSUMER_BATCH="64",
            MAAS_CONSUMER_WAIT_MS="0",
        )
        settings = Settings.from_env(env)
        redis_pid = server.pid
        admin = redis.Redis.from_url(server.url)
        plain = PlainCelery(server.url, tmp / "plain.log", args.plain_prefetch)
        try:
            plain.run(min(200, args.jobs))  # warm-up
            for mode in modes:
                worker = WorkerProcess(
                    env=env, name=mode, log_path=tmp / f"{mode}.log", extra_args=MODES[mode]
                )
                worker.start()
                try:
                    worker.wait_ready(redis.Redis.from_url(server.url))
                    assert worker.proc is not None
                    secure_run(settings, args.model, min(200, args.jobs), args.chunk)  # warm-up
                    spies: list[subprocess.Popen[bytes]] = []
                    prof: cProfile.Profile | None = None
                    if args.profile:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        prof = cProfile.Profile()
                        # One py-spy per process of the worker (its main process, the
                        # pool or the batch consumers), so every one is sampled.
                        spy_bin = str(Path(sys.executable).parent / "py-spy")
                        procs = [psutil.Process(worker.proc.pid)]
                        procs += procs[0].children(recursive=True)
                        for proc in procs:
                            out = args.profile / f"worker-{mode}-{proc.pid}.txt"
                            spies.append(subprocess.Popen(
                                [spy_bin, "record", "--nonblocking", "--format", "raw",
                                 "--rate", "200", "-o", str(out), "-p", str(proc.pid)],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                            ))  # fmt: skip
                    for _ in range(args.repeat):
                        p = measure(
                            lambda: plain.run(args.jobs),
                            args.jobs,
                            {"producer": os.getpid(), "worker": plain.proc.pid, "redis": redis_pid},
                        )
                        if prof is not None:
                            prof.enable()
                        admin.config_resetstat()
                        s = measure(
                            lambda: secure_run(settings, args.model, args.jobs, args.chunk),
                            args.jobs,
                            {
                                "producer": os.getpid(),
                                "worker": worker.proc.pid,
                                "redis": redis_pid,
                            },
                        )
                        if prof is not None:
                            prof.disable()
                        add_commandstats(redis_work.setdefault(mode, Counter()), admin)
                        rows.setdefault("plain Celery", []).append(p)
                        rows.setdefault(f"secure, {mode}", []).append(s)
                        ratios.setdefault(mode, []).append(s[0] / p[0])
                        print(f"  {mode}: {s[0]:.0f} jobs/s; plain {p[0]:.0f} jobs/s", flush=True)
                    if prof is not None and args.profile:
                        for spy in spies:
                            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                        for spy in spies:
                            spy.wait(60)
                        print_producer_profile(
                            prof, args.jobs * args.repeat, args.profile / f"producer-{mode}.prof"
                        )
                        print_spy_profile(sorted(args.profile.glob(f"worker-{mode}-*.txt")))
                finally:
                    worker.stop()
        finally:
            plain.stop()
    print("\n| setup | jobs/s median [min-max] | CPU ms/job (producer + worker + Redis) |")
    print("| --- | ---: | --- |")
    for name, runs in rows.items():
        print(f"| {name} | {summary([r[0] for r in runs])} | {cpu_summary([r[1] for r in runs])} |")
    for mode, work in redis_work.items():
        jobs = args.jobs * args.repeat
        usec = sum(v for k, v in work.items() if k.endswith(":usec"))
        print(
            f"\nRedis, secure {mode}: {usec / jobs:.1f} us of server time per job "
            "(INFO commandstats; commands run by scripts counted under their own names)"
        )
        print("| command | calls/job | us/job |")
        print("| --- | ---: | ---: |")
        names = sorted({k.rsplit(":", 1)[0] for k in work}, key=lambda n: -work[n + ":usec"])
        for name in names[:14]:
            print(
                f"| {name} | {work[name + ':calls'] / jobs:.3f} "
                f"| {work[name + ':usec'] / jobs:.2f} |"
            )
    for mode, rs in ratios.items():
        print(
            f"secure {mode} / plain (same round): median {statistics.median(rs):.2f} "
            f"(rounds: {', '.join(f'{r:.2f}' for r in rs)})"
        )


if __name__ == "__main__":
    main()
