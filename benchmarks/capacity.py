"""Benchmark: the capacity model, what one job costs Redis (#17, docs/scaling.md).

Not a test. One embedded Valkey; the producer (this process), Valkey and one
worker node (``--concurrency 2``) share the machine. Per model, worker mode and
producer, a run submits ``--jobs`` jobs and waits for every result; around each
run the server's ``INFO all`` is read twice and the difference, divided by the
jobs, is the cost of a job:

* commands by name (``INFO commandstats``: calls and server microseconds; the
  commands a script runs count there under their own names too, so one more
  run per setup under ``MONITOR``, untimed (the census; ``--no-census`` skips
  it), says who sent each command: the producer, the worker, or a script
  (``EVALSHA``/``FCALL``), and, from each connection's ``tot-net-in/out``, whose
  bytes they were);
* bytes in and out (``total_net_input_bytes`` / ``total_net_output_bytes``);
* memory held per finished job (``used_memory`` growth over the run: results
  and markers, until ``MAAS_RESULT_TTL_S``);
* Redis CPU: ``used_cpu_user + used_cpu_sys`` of the server process (``INFO
  cpu``), and the worker's and producer's CPU (psutil);
* memory held per queued job: with no worker up, ``used_memory`` and ``DBSIZE``
  before and after ``--jobs`` more jobs are queued (``--repeat`` times).

Reported: medians of ``--repeat`` runs, then the capacity they imply: jobs/s
one Redis core serves (1 s / Redis CPU per job), the network bytes/s at that
rate, the worker cores per 1,000 jobs/s, the memory per million queued jobs.

    .venv/bin/python benchmarks/capacity.py [--jobs 2000] [--repeat 3]
        [--models echo,digits] [--modes celery,batch] [--producers async,sync,single]
        [--top 16] [--no-census]

The worker modes' flags are named in one place, `worker_modes`.

Producers: ``async`` = `AsyncClient.submit_many` in chunks of ``--chunk`` and
`as_completed` (as benchmarks/throughput.py); ``sync`` = `Client.submit_many`
and `Client.as_completed`; ``single`` = `Client.submit` once per job, then
`Client.as_completed`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil
import redis

from benchmarks.stack import bench_env, cpu_s
from maas_worker import AsyncClient, Client, as_completed
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.settings import Settings

ECHO = {"data": "x" * 1024}
#: Commands of this benchmark itself (its reads of the counters, the census's end mark).
OWN_COMMANDS = frozenset({"info", "echo", "monitor", "client|list"})
#: Commands whose first argument is a subcommand (commandstats names them ``a|b``).
CONTAINERS = frozenset(
    {"acl", "client", "cluster", "command", "config", "function", "memory", "object",
     "pubsub", "script", "xinfo", "xgroup", "latency", "slowlog"}
)  # fmt: skip
SCRIPT_CALLS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})


def worker_modes() -> dict[str, tuple[str, ...]]:
    """``maas-worker worker``'s flags for each mode: the one place they are named.

    ``celery`` runs one Celery task per job, ``batch`` the batch consumer. A CLI whose
    default is the batch consumer has a ``--celery-tasks`` opt-out; this one, an
    opt-in ``--batch-consumer``: the flags follow whichever the installed CLI has, so a
    mode never silently runs the other engine."""
    from maas_worker.cli.services import worker

    flags = {opt for param in worker.params for opt in param.opts}
    if "--celery-tasks" in flags:
        return {"celery": ("--celery-tasks",), "batch": ()}
    return {"celery": (), "batch": ("--batch-consumer",)}


# -- the arithmetic (pure; tests/unit/test_capacity_bench.py) ----------------------------------
@dataclass(frozen=True)
class Counters:
    """What one ``INFO all`` says that the model needs."""

    #: Command name (as commandstats names it: ``get``, ``client|setinfo``) -> (calls, usec).
    commands: Mapping[str, tuple[int, int]]
    net_in: int
    net_out: int
    cpu_s: float
    sys_cpu_s: float
    used_memory: int
    keys: int

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> Counters:
        """From redis-py's parsed ``INFO all`` (``cmdstat_*`` rows as dicts)."""
        commands = {
            name.removeprefix("cmdstat_"): (int(row["calls"]), int(row["usec"]))
            for name, row in info.items()
            if name.startswith("cmdstat_")
        }
        db0 = info.get("db0") or {}
        return cls(
            commands=commands,
            net_in=int(info["total_net_input_bytes"]),
            net_out=int(info["total_net_output_bytes"]),
            cpu_s=float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            sys_cpu_s=float(info["used_cpu_sys"]),
            used_memory=int(info["used_memory"]),
            keys=int(db0.get("keys", 0)),
        )


@dataclass(frozen=True)
class JobCost:
    """What one job cost, averaged over a run (the difference of two `Counters`)."""

    calls: Mapping[str, float]
    usec: Mapping[str, float]
    bytes_in: float
    bytes_out: float
    redis_cpu_ms: float
    #: Of ``redis_cpu_ms``, the kernel's (system calls: reading and writing sockets).
    redis_sys_ms: float
    #: ``used_memory`` growth per job over a run: what a finished job leaves behind
    #: (its result and markers) until ``MAAS_RESULT_TTL_S`` expires it.
    held_bytes: float = 0.0
    worker_cpu_ms: float = 0.0
    producer_cpu_ms: float = 0.0
    jobs_per_s: float = 0.0

    @property
    def commands(self) -> float:
        """Commands run per job, those inside scripts included."""
        return sum(self.calls.values())

    @property
    def script_usec(self) -> float:
        """Server microseconds per job in scripts (their inner commands included)."""
        return sum(v for k, v in self.usec.items() if k in SCRIPT_CALLS)


def job_cost(before: Counters, after: Counters, jobs: int) -> JobCost:
    """Per-job differences of two readings; the benchmark's own commands left out."""
    calls: dict[str, float] = {}
    usec: dict[str, float] = {}
    for name, (n, us) in after.commands.items():
        n0, us0 = before.commands.get(name, (0, 0))
        if name in OWN_COMMANDS or n == n0:
            continue
        calls[name] = (n - n0) / jobs
        usec[name] = (us - us0) / jobs
    return JobCost(
        calls=calls,
        usec=usec,
        bytes_in=(after.net_in - before.net_in) / jobs,
        bytes_out=(after.net_out - before.net_out) / jobs,
        redis_cpu_ms=(after.cpu_s - before.cpu_s) * 1000 / jobs,
        redis_sys_ms=(after.sys_cpu_s - before.sys_cpu_s) * 1000 / jobs,
        held_bytes=(after.used_memory - before.used_memory) / jobs,
    )


def median_cost(costs: list[JobCost]) -> JobCost:
    """The median of each figure over runs (a command missing from a run counts 0)."""
    names = sorted({n for c in costs for n in c.calls})

    def med(get: Callable[[JobCost], float]) -> float:
        return statistics.median(get(c) for c in costs)

    def by_name(field: Callable[[JobCost], Mapping[str, float]]) -> dict[str, float]:
        return {n: statistics.median(field(c).get(n, 0.0) for c in costs) for n in names}

    return JobCost(
        calls=by_name(lambda c: c.calls),
        usec=by_name(lambda c: c.usec),
        bytes_in=med(lambda c: c.bytes_in),
        bytes_out=med(lambda c: c.bytes_out),
        redis_cpu_ms=med(lambda c: c.redis_cpu_ms),
        redis_sys_ms=med(lambda c: c.redis_sys_ms),
        held_bytes=med(lambda c: c.held_bytes),
        worker_cpu_ms=med(lambda c: c.worker_cpu_ms),
        producer_cpu_ms=med(lambda c: c.producer_cpu_ms),
        jobs_per_s=med(lambda c: c.jobs_per_s),
    )


@dataclass(frozen=True)
class Capacity:
    """What a per-job cost implies at the scale of one Redis core."""

    #: Jobs/s that saturate one Redis core: 1 s / Redis CPU per job.
    jobs_per_redis_core: float
    #: Network bytes/s (in + out of Redis) at that rate.
    bytes_per_s: float
    #: Commands/s at that rate.
    commands_per_s: float
    #: Worker CPU cores busy per 1,000 jobs/s.
    worker_cores_per_1000: float


def capacity(cost: JobCost) -> Capacity:
    """The capacity formulas of docs/scaling.md, on a measured per-job cost."""
    rate = 1000.0 / cost.redis_cpu_ms if cost.redis_cpu_ms > 0 else float("inf")
    return Capacity(
        jobs_per_redis_core=rate,
        bytes_per_s=(cost.bytes_in + cost.bytes_out) * rate,
        commands_per_s=cost.commands * rate,
        worker_cores_per_1000=cost.worker_cpu_ms,  # ms per job x 1,000 jobs/s / 1,000 ms
    )


def command_name(line: str) -> str:
    """The commandstats name of a command as ``MONITOR`` prints it (``CLIENT SETINFO ..``
    -> ``client|setinfo``)."""
    parts = line.split(" ", 2)
    name = parts[0].strip('"').lower()
    if name in CONTAINERS and len(parts) > 1:
        return f"{name}|{parts[1].strip(chr(34)).lower()}"
    return name


# -- the runs ----------------------------------------------------------------------------------
def inputs_for(model: str, n: int) -> list[Any]:
    """``n`` inputs: 1 KiB of echo, or one 8x8 digits sample (pixel values 0-16) each."""
    if model == "echo":
        return [ECHO] * n
    return [{"inputs": [[(i + j) % 17 for j in range(64)]]} for i in range(n)]


def produce(
    producer: str,
    settings: Settings,
    model: str,
    n: int,
    chunk: int,
    *,
    wait: bool = True,
    before_close: Callable[[], None] = lambda: None,
) -> None:
    """Submit ``n`` jobs with ``producer`` and (``wait``) open every result."""
    inputs = inputs_for(model, n)
    if producer == "async":

        async def main() -> None:
            async with AsyncClient(settings=settings) as client:
                jobs = []
                for start in range(0, n, chunk):
                    jobs += await client.submit_many(model, inputs[start : start + chunk])
                if wait:
                    done = 0
                    async for job in as_completed(jobs, timeout=600):
                        await job.result()  # opened: verified and bound to its request
                        done += 1
                    assert done == n
                before_close()

        asyncio.run(main())
        return
    with Client(settings=settings) as client:
        if producer == "sync":
            jobs = [
                job
                for start in range(0, n, chunk)
                for job in client.submit_many(model, inputs[start : start + chunk])
            ]
        else:
            jobs = [client.submit(model, x) for x in inputs]
        if wait:
            assert len(client.results(jobs, timeout=600)) == n
        before_close()


def client_ports(pids: Iterable[int], server_port: int) -> set[int]:
    """Local ports of the connections of ``pids`` to the server."""
    ports = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        ports |= {c.laddr.port for c in conns if c.raddr and c.raddr.port == server_port}
    return ports


def timed_run(admin: redis.Redis, worker_pid: int, run: Callable[[], None], jobs: int) -> JobCost:
    """One measured run: the server's counters and the processes' CPU around ``run``."""
    worker0, producer0 = cpu_s(worker_pid, tree=True), cpu_s(os.getpid(), tree=False)
    before = Counters.from_info(admin.info("all"))
    t = time.perf_counter()
    run()
    elapsed = time.perf_counter() - t
    after = Counters.from_info(admin.info("all"))
    return replace(
        job_cost(before, after, jobs),
        worker_cpu_ms=(cpu_s(worker_pid, tree=True) - worker0) * 1000 / jobs,
        producer_cpu_ms=(cpu_s(os.getpid(), tree=False) - producer0) * 1000 / jobs,
        jobs_per_s=jobs / elapsed,
    )


#: The census's end mark (an ``ECHO`` the ``MONITOR`` reader stops at).
END_MARK = "capacity-census-end"
SIDES = ("producer", "worker", "script", "other")


@dataclass(frozen=True)
class Census:
    """Who ran a run's commands, and who moved its bytes (one run under ``MONITOR``)."""

    #: Command -> side -> share of its calls: ``producer``, ``worker``, ``script`` (run
    #: inside an ``EVALSHA``/``FCALL``), ``other`` (a connection closed before its owner
    #: was seen).
    shares: Mapping[str, Mapping[str, float]]
    #: Side -> (bytes in, bytes out) per job, from the connections' ``tot-net-in/out``.
    bytes_by_side: Mapping[str, tuple[float, float]]


def shares_of(rows: Iterable[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """(side, command) rows -> command -> side -> share of that command's calls."""
    counts: dict[str, Counter[str]] = {}
    for side, name in rows:
        if name not in OWN_COMMANDS:
            counts.setdefault(name, Counter())[side] += 1
    return {n: {s: v / sum(c.values()) for s, v in c.items()} for n, c in counts.items()}


def split_calls(cost: JobCost, shares: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Calls per job by side: each command's calls (commandstats) by its census shares
    (a command the census did not see counts as sent by ``other``)."""
    out = dict.fromkeys(SIDES, 0.0)
    for name, calls in cost.calls.items():
        for side, share in shares.get(name, {"other": 1.0}).items():
            out[side] += calls * share
    return out


def census(
    server: EmbeddedRedis, worker_pid: int, run: Callable[[Callable[[], None]], None], jobs: int
) -> Census:
    """Run ``run`` once under ``MONITOR`` (slow, so never timed) and tell the producer's,
    the worker's and the scripts' commands apart; each connection's byte counters
    before and after give the bytes by side."""
    rows: list[tuple[str, str]] = []  # (client port or "lua", command name)
    mon = redis.Redis.from_url(server.url)
    admin = redis.Redis.from_url(server.url)
    ready = threading.Event()

    def listen() -> None:
        with mon.monitor() as m:  # type: ignore[no-untyped-call]
            ready.set()
            for cmd in m.listen():
                name = command_name(cmd["command"])
                if name == "echo" and END_MARK in cmd["command"]:
                    return
                rows.append(("lua" if cmd["client_type"] == "lua" else cmd["client_port"], name))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    start = {c["id"]: c for c in admin.client_list()}
    producer_ports: set[int] = set()
    seen: dict[str, dict[str, Any]] = {}

    def before_close() -> None:  # the producer's connections, before they close
        producer_ports.update(client_ports([os.getpid()], server.port))
        seen.update({c["id"]: c for c in admin.client_list()})

    run(before_close)
    worker = psutil.Process(worker_pid)
    worker_ports = client_ports(
        [worker_pid, *(p.pid for p in worker.children(recursive=True))], server.port
    )
    seen.update({c["id"]: c for c in admin.client_list()})
    admin.echo(END_MARK)
    thread.join(120)
    mon.close()
    admin.close()

    def side(port: str) -> str:
        if port == "lua":
            return "script"
        return (
            "worker"
            if int(port) in worker_ports
            else "producer"
            if int(port) in producer_ports
            else "other"
        )

    moved: dict[str, list[float]] = {}
    for cid, conn in seen.items():
        if conn["cmd"] in ("monitor", "client|list", "echo"):
            continue  # this benchmark's own connections
        old = start.get(cid, {})
        into = moved.setdefault(side(conn["addr"].rsplit(":", 1)[1]), [0.0, 0.0])
        into[0] += (int(conn["tot-net-in"]) - int(old.get("tot-net-in", 0))) / jobs
        into[1] += (int(conn["tot-net-out"]) - int(old.get("tot-net-out", 0))) / jobs
    return Census(
        shares=shares_of((side(port), name) for port, name in rows),
        bytes_by_side={k: (v[0], v[1]) for k, v in moved.items()},
    )


def top_level_usec(cost: JobCost, shares: Mapping[str, Mapping[str, float]]) -> float:
    """Server microseconds per job of the commands clients sent: a script's time
    includes its inner commands, so those are left out (by their census share)."""
    return sum(us * (1 - shares.get(n, {}).get("script", 0.0)) for n, us in cost.usec.items())


KEY_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def key_shapes(keys: Iterable[bytes]) -> Counter[str]:
    """Key names with job ids replaced by ``<id>``, counted."""
    import re

    return Counter(re.sub(KEY_ID, "<id>", k.decode(errors="replace")) for k in keys)


def queued_memory(
    admin: redis.Redis, settings: Settings, model: str, n: int, chunk: int, repeat: int
) -> tuple[list[tuple[float, float]], Counter[str]]:
    """With no worker up: bytes and keys each queued job adds (``repeat`` batches of
    ``n``, each measured after the producer has closed its connections), and the
    shapes of the new keys of the first batch (per job)."""
    out = []
    shapes: Counter[str] = Counter()
    for i in range(repeat):
        keys0 = set(admin.scan_iter(count=1000)) if i == 0 else set()
        before = Counters.from_info(admin.info("all"))
        produce("async", settings, model, n, chunk, wait=False)
        after = Counters.from_info(admin.info("all"))
        out.append(((after.used_memory - before.used_memory) / n, (after.keys - before.keys) / n))
        if i == 0:
            shapes = key_shapes(k for k in admin.scan_iter(count=1000) if k not in keys0)
    return out, shapes


# -- the report ---------------------------------------------------------------------------------
def print_setup(name: str, cost: JobCost, found: Census | None, top: int) -> None:
    """One setup's per-job costs by command, and the capacity they imply."""
    cap = capacity(cost)
    shares = found.shares if found else {}
    print(f"\n### {name}")
    print(
        f"{cost.jobs_per_s:.0f} jobs/s here; CPU ms/job: producer {cost.producer_cpu_ms:.3f}, "
        f"worker {cost.worker_cpu_ms:.3f}, Redis {cost.redis_cpu_ms:.3f} "
        f"(system {cost.redis_sys_ms:.3f}); commandstats: "
        f"{top_level_usec(cost, shares):.1f} us/job in commands sent "
        f"({cost.script_usec:.1f} of it in scripts)"
    )
    by_side = split_calls(cost, shares)
    print(
        f"{cost.commands:.1f} commands/job: "
        + ", ".join(f"{side} {by_side[side]:.1f}" for side in SIDES)
        + f"; {cost.bytes_in:,.0f} bytes in, {cost.bytes_out:,.0f} out per job; "
        + f"{cost.held_bytes:,.0f} bytes held per finished job"
        + (
            " ("
            + ", ".join(
                f"{k} {i:,.0f} in / {o:,.0f} out" for k, (i, o) in found.bytes_by_side.items()
            )
            + ", census run)"
            if found
            else ""
        )
    )
    print(
        f"capacity: {cap.jobs_per_redis_core:,.0f} jobs/s per Redis core, "
        f"{cap.bytes_per_s / 1e6:.1f} MB/s and {cap.commands_per_s:,.0f} commands/s at that "
        f"rate; {cap.worker_cores_per_1000:.2f} worker cores per 1,000 jobs/s"
    )
    print("| command | calls/job | producer | worker | in scripts | us/job |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for cmd in sorted(cost.calls, key=lambda c: -cost.calls[c])[:top]:
        sh = shares.get(cmd, {})
        calls = cost.calls[cmd]
        print(
            f"| {cmd} | {calls:.3f} | {calls * (sh.get('producer', 0) + sh.get('other', 0)):.3f} "
            f"| {calls * sh.get('worker', 0):.3f} | {calls * sh.get('script', 0):.3f} "
            f"| {cost.usec[cmd]:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--models", default="echo,digits")
    ap.add_argument("--modes", default="celery,batch")
    ap.add_argument("--producers", default="async")
    ap.add_argument("--top", type=int, default=16, help="commands listed per setup")
    ap.add_argument("--no-census", action="store_true", help="skip the MONITOR runs")
    args = ap.parse_args()
    models, producers = args.models.split(","), args.producers.split(",")
    flags = worker_modes()
    modes = {m: flags[m] for m in args.modes.split(",")}
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.platform()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; Python {platform.python_version()}; "
        f"{args.jobs} jobs a run, {args.repeat} runs, chunks of {args.chunk}; "
        f"worker modes {modes}"
    )
    results: dict[str, tuple[JobCost, Census | None]] = {}
    memory: dict[str, tuple[list[tuple[float, float]], Counter[str]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name, EmbeddedRedis() as server:
        tmp = Path(tmp_name)
        env = bench_env(
            tmp,
            server.url,
            MAAS_METRICS_PORT="0",  # other workers may hold the default port
            MAAS_MAX_QUEUE_DEPTH=str(args.jobs * (args.repeat + 1) * len(models) * 2),
        )
        settings = Settings.from_env(env)
        admin = redis.Redis.from_url(server.url)
        info = admin.info("all")
        print(f"server: {info['server_name']} {info['valkey_version']}, "
              f"allocator {info['mem_allocator']}")  # fmt: skip
        for mode, mode_flags in modes.items():
            worker = WorkerProcess(
                env=env, name=mode, log_path=tmp / f"{mode}.log", extra_args=mode_flags
            )
            worker.start()
            try:
                worker.wait_ready(admin)
                assert worker.proc is not None
                pid = worker.proc.pid
                for model in models:
                    produce("async", settings, model, min(200, args.jobs), args.chunk)  # warm-up
                    for producer in producers:

                        def run(
                            hook: Callable[[], None] = lambda: None,
                            producer: str = producer,
                            model: str = model,
                        ) -> None:
                            produce(
                                producer, settings, model, args.jobs, args.chunk, before_close=hook
                            )

                        costs = [timed_run(admin, pid, run, args.jobs) for _ in range(args.repeat)]
                        found = None if args.no_census else census(server, pid, run, args.jobs)
                        name = f"{model}, {mode} worker, {producer} producer"
                        results[name] = (median_cost(costs), found)
                        print(
                            f"  {name}: jobs/s "
                            + ", ".join(f"{c.jobs_per_s:.0f}" for c in costs)
                            + "; Redis CPU ms/job "
                            + ", ".join(f"{c.redis_cpu_ms:.3f}" for c in costs),
                            flush=True,
                        )
            finally:
                worker.stop()
        for model in models:
            memory[model] = queued_memory(
                admin, settings, model, args.jobs, args.chunk, args.repeat
            )
        admin.close()
    for name, (cost, found) in results.items():
        print_setup(name, cost, found, args.top)
    print("\n## Summary (medians)")
    print(
        "| setup | jobs/s here | commands/job (sent + in scripts) | bytes in / out per job "
        "| Redis CPU ms/job | worker CPU ms/job | producer CPU ms/job "
        "| jobs/s per Redis core | MB/s at that rate |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (cost, found) in results.items():
        cap = capacity(cost)
        inner = split_calls(cost, found.shares)["script"] if found else 0.0
        split = f" ({cost.commands - inner:.1f} + {inner:.1f})" if found else ""
        print(
            f"| {name} | {cost.jobs_per_s:.0f} | {cost.commands:.1f}{split} "
            f"| {cost.bytes_in:,.0f} / {cost.bytes_out:,.0f} | {cost.redis_cpu_ms:.3f} "
            f"| {cost.worker_cpu_ms:.3f} | {cost.producer_cpu_ms:.3f} "
            f"| {cap.jobs_per_redis_core:,.0f} | {cap.bytes_per_s / 1e6:.1f} |"
        )
    print("\n## Memory held per queued job (no worker up)")
    print("| model | bytes/job (runs) | keys/job | per million queued jobs | new keys per job |")
    print("| --- | ---: | ---: | ---: | --- |")
    for model, (runs, shapes) in memory.items():
        per_job = statistics.median(b for b, _ in runs)
        keys = statistics.median(k for _, k in runs)
        detail = ", ".join(
            f"`{s}` {c / args.jobs:.2f}" for s, c in shapes.most_common(6) if c >= args.jobs / 100
        )
        print(
            f"| {model} | {per_job:,.0f} ({', '.join(f'{b:,.0f}' for b, _ in runs)}) "
            f"| {keys:.2f} | {per_job * 1e6 / 2**30:.2f} GiB | {detail} |"
        )


if __name__ == "__main__":
    main()
