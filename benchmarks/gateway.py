"""Benchmark: submitting through the HTTP gateway against the direct Python client.

Not a test. One run, one embedded Valkey, no worker (the jobs stay queued: this
measures the submit path only), one gateway process (uvicorn, one event loop)
on the same machine. Every path seals in the timed loop.

* latency: ``--single`` submits one at a time, one after the other; p50 and
  p99 of each submit. The direct client is `AsyncClient.submit`; the gateway
  path is the caller sealing then ``POST /v1/jobs`` on a kept-alive
  connection (HTTP/1.1 spoken by hand, so the caller's HTTP library is not what
  is measured). "added p50" is the difference;
* throughput, single: ``--concurrency`` callers submitting one job per
  request at once (asyncio tasks, one connection each; `AsyncClient.submit`
  for the direct path);
* throughput, batched: ``submit_many`` of ``--batch`` jobs against
  ``POST /v1/jobs:batch`` of as many envelopes, one after the other (with
  ``--inflight N``, N at a time: N concurrent ``submit_many`` on the one
  client, or N connections to the gateway).

``--repeat N`` runs the direct path and the gateway path N times, alternately,
against the same gateway and Valkey, and prints the median [min-max] of each
figure. ``--phases batched`` runs the batched phase only. The batched phase
also reports CPU time per job (user + system, psutil) of every process on the
path: the client, or the caller and the gateway, and Valkey; on a shared
machine it is steadier than submits/s.

``--profile DIR`` profiles the batched phase (cProfile) on every side: the
direct client (``DIR/direct.prof``), the gateway's caller (sealing, base64,
JSON, the HTTP exchange: ``DIR/caller.prof``) and the gateway process itself
(``DIR/gateway.prof``: run under the benchmark's own ``--serve-profiled``,
which turns cProfile on and off at SIGUSR1 and SIGUSR2 around the phase). It
prints each side's own time per job by library and its top functions; the
timed figures of a profiled run are not comparable with an unprofiled one.
``--spy FILE`` instead samples the gateway process with py-spy (no cProfile
overhead; the ``dev`` extra) during the batched phase, writes the raw stacks
to FILE and prints the share of its busy samples under each step of a submit.

    .venv/bin/python benchmarks/gateway.py [--single 2000] [--jobs 20000] [--batch 500]
        [--repeat 3] [--phases single,concurrent,batched] [--profile DIR] [--top 20]
        [--spy FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import json
import os
import platform
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stack import bench_env
from maas_worker import AsyncClient
from maas_worker.crypto.envelope import Header, now_ms, seal
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.settings import Settings
from maas_worker.tenancy.gatekeys import GatewayKeyring, bearer_token, save_gateway_keyring
from maas_worker.tenancy.keyring import Keyring

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_submit import library

PHASES = ("single", "concurrent", "batched")
#: The steps of a gateway submit, as py-spy names their frames (``--spy``).
SPY_STEPS = (
    ("HTTP handler (uvicorn, Starlette, body, JSON, base64)", "submit_batch (maas_worker"),
    ("Gateway.submit_items", "submit_items (maas_worker/gateway/service.py"),
    ("  screen (every envelope, no I/O)", "_screen (maas_worker/gateway/service.py"),
    ("    verify (MAC, time window)", "verify (maas_worker/crypto/envelope.py"),
    ("    policy and catalogue", "_check_policy (maas_worker"),
    ("  claim ids and markers (FCALL)", "_claim_ids (maas_worker"),
    ("  enqueue (depth, quota, entries, push)", "_enqueue (maas_worker"),
    ("    queue entries (wire.py)", "messages (maas_worker/client/wire.py"),
    ("  answers of refused or repeated envelopes", "_accepted (maas_worker"),
    ("RESP packing (anywhere)", "pack (maas_worker/backend/resp.py"),
    ("redis-py packing (anywhere)", "pack_command (redis"),
    ("redis-py replies (anywhere)", "read_response (redis"),
)


class Sealer:
    """The caller's side: seal as any language would (docs/envelope.md)."""

    def __init__(self, ring: Keyring) -> None:
        self.kv = ring.tenant("acme").primary()
        self.keys = self.kv.keys("acme")
        self.token = bearer_token(self.kv.secret, "acme", self.kv.version)

    def seal(self, n: int) -> bytes:
        issued = now_ms()
        header = Header(
            "request", self.kv.version, issued, issued + 300_000, "normal", "acme",
            str(uuid.uuid4()), "maas.infer", "echo",
        )  # fmt: skip
        return seal(self.keys, header, json.dumps({"n": n}, separators=(",", ":")).encode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def _cpu_s(pids: list[int]) -> list[float]:
    """User + system CPU seconds of each process of ``pids``."""
    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


def _cpu_us_per_job(before: list[float], pids: list[int], jobs: int) -> list[float]:
    return [(after - b) * 1e6 / jobs for b, after in zip(before, _cpu_s(pids), strict=True)]


@contextlib.contextmanager
def _profiled(prof: cProfile.Profile | None) -> Iterator[None]:
    if prof is not None:
        prof.enable()
    try:
        yield
    finally:
        if prof is not None:
            prof.disable()


async def direct(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with AsyncClient(settings=settings) as client:
        await client.submit("echo", {"warm": 1})
        if "single" in args.phases:
            times = []
            for n in range(args.single):
                t = time.perf_counter()
                await client.submit("echo", {"n": n})
                times.append(time.perf_counter() - t)
            out["p50"], out["p99"] = _pct(times, 50), _pct(times, 99)

        async def one(n: int) -> None:
            await client.submit("echo", {"n": n})

        if "concurrent" in args.phases:
            t = time.perf_counter()
            for start in range(0, args.jobs, args.concurrency):
                await asyncio.gather(*(one(n) for n in range(start, start + args.concurrency)))
            out["concurrent"] = args.jobs / (time.perf_counter() - t)
        if "batched" in args.phases:
            await client.submit_many("echo", [{"n": n} for n in range(args.batch)])  # warm
            prof = args.profilers.get("direct")
            pids = [os.getpid(), args.redis_pid]
            cpu = _cpu_s(pids)
            t = time.perf_counter()

            async def lane(first: int) -> None:
                for start in range(first, args.jobs, args.batch * args.inflight):
                    inputs = [{"n": n} for n in range(start, start + args.batch)]
                    await client.submit_many("echo", inputs)

            with _profiled(prof):
                await asyncio.gather(*(lane(i * args.batch) for i in range(args.inflight)))
            out["batched"] = args.jobs / (time.perf_counter() - t)
            out["cpu"] = _cpu_us_per_job(cpu, pids, args.jobs)
    return out


class Conn:
    """One kept-alive HTTP/1.1 connection, spoken by hand: the caller's HTTP stack stays
    out of the figures (httpx's own cost per request is larger than the gateway's)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes, ctype: str, token: str) -> tuple[int, bytes]:
        self.w.write(
            f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status = int((await self.r.readline()).split()[1])
        length = 0
        while (line := await self.r.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.r.readexactly(length)

    def close(self) -> None:
        self.w.close()


async def gateway(
    port: int, sealer: Sealer, args: argparse.Namespace, server: subprocess.Popen[bytes]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    conns = [await Conn.open(port) for _ in range(args.concurrency)]

    async def one(conn: Conn, n: int) -> None:
        status, body = await conn.post(
            "/v1/jobs", sealer.seal(n), "application/octet-stream", sealer.token
        )
        assert status == 202, body

    async def batch(start: int, size: int, conn: Conn | None = None) -> None:
        envelopes = [base64.b64encode(sealer.seal(n)).decode() for n in range(start, start + size)]
        doc = json.dumps({"envelopes": envelopes}).encode()
        conn = conn or conns[0]
        status, body = await conn.post("/v1/jobs:batch", doc, "application/json", sealer.token)
        assert status == 200 and all(i["status"] == 202 for i in json.loads(body)["items"])

    await one(conns[0], -1)
    if "single" in args.phases:
        times = []
        for n in range(args.single):
            t = time.perf_counter()
            await one(conns[0], n)
            times.append(time.perf_counter() - t)
        out["p50"], out["p99"] = _pct(times, 50), _pct(times, 99)
    if "concurrent" in args.phases:
        t = time.perf_counter()
        for start in range(0, args.jobs, args.concurrency):
            await asyncio.gather(*(one(c, start + i) for i, c in enumerate(conns)))
        out["concurrent"] = args.jobs / (time.perf_counter() - t)
    if "batched" in args.phases:
        await batch(-args.batch, args.batch)  # warm
        prof = args.profilers.get("caller")
        if prof is not None:
            server.send_signal(signal.SIGUSR1)  # the gateway's profiler on (--serve-profiled)
            await asyncio.sleep(0.2)
        spy = None
        if args.spy:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.pid),
                 "--format", "raw", "--nonblocking", "-r", "250", "-o", args.spy],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.sleep(1.0)  # py-spy attaches
        pids = [os.getpid(), server.pid, args.redis_pid]
        cpu = _cpu_s(pids)
        t = time.perf_counter()

        async def lane(first: int, conn: Conn) -> None:
            for start in range(first, args.jobs, args.batch * args.inflight):
                await batch(start, args.batch, conn)

        with _profiled(prof):
            await asyncio.gather(*(lane(i * args.batch, conns[i]) for i in range(args.inflight)))
        out["batched"] = args.jobs / (time.perf_counter() - t)
        out["cpu"] = _cpu_us_per_job(cpu, pids, args.jobs)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(30)
        if prof is not None:
            server.send_signal(signal.SIGUSR2)  # off, and its stats (so far) written
    for c in conns:
        c.close()
    return out


def serve_profiled(out: str, argv: list[str]) -> None:
    """Run ``maas-worker <argv>`` (the gateway) with cProfile on between SIGUSR1 and
    SIGUSR2; at SIGUSR2 the stats go to ``out`` (the gateway is one thread, one loop)."""
    from maas_worker.cli import main as cli_main

    prof = cProfile.Profile()

    def on(_sig: int, _frame: object) -> None:
        prof.enable()

    def off(_sig: int, _frame: object) -> None:
        prof.disable()
        prof.dump_stats(out)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    raise SystemExit(cli_main(argv))


def report_profile(path: Path, jobs: int, top: int, title: str) -> float:
    """Print a profile's own time per job by library and its top functions; the total
    own time per job (us)."""
    stats = pstats.Stats(str(path))
    own: dict[str, float] = defaultdict(float)
    total = 0.0
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        own[library(filename, name)] += tt
        total += tt
    print(f"\n== {title}: own time {total / jobs * 1e6:.1f} us/job (cProfile) ==")
    for lib, tt in sorted(own.items(), key=lambda kv: -kv[1]):
        print(f"  {lib:28s} {tt / jobs * 1e6:7.1f} us/job  {tt / total:6.1%}")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return total / jobs * 1e6


def report_spy(path: str) -> None:
    """The share of the gateway's busy samples (in a request) under each step."""
    busy = 0
    under: dict[str, int] = defaultdict(int)
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "run_asgi" not in stack:
            continue  # the event loop waiting, or py-spy's own idle stacks
        busy += int(count)
        for name, frame in SPY_STEPS:
            if frame in stack:
                under[name] += int(count)
    print(f"\ngateway process under py-spy ({path}): {busy} busy samples")
    for name, _ in SPY_STEPS:
        print(f"  {name:56s} {under[name] / max(busy, 1):6.1%}")


def _median(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def main() -> None:
    if sys.argv[1:2] == ["--serve-profiled"]:
        serve_profiled(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", type=int, default=2000, help="sequential submits timed")
    ap.add_argument("--jobs", type=int, default=20_000, help="jobs for each throughput figure")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--inflight", type=int, default=1, help="batches in flight at once (batched phase)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="rounds of each path, alternately")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    ap.add_argument("--profile", metavar="DIR", help="cProfile the batched phase on each side")
    ap.add_argument("--top", type=int, default=20, help="functions listed per profile")
    ap.add_argument("--spy", metavar="FILE", help="py-spy the gateway in the batched phase")
    args = ap.parse_args()
    args.phases = set(args.phases.split(","))
    # One profiler per side in this process, kept over the rounds (the gateway's own
    # does the same in its process).
    args.profilers = {}
    if args.profile or args.spy:
        args.phases.add("batched")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        args.profilers = {"direct": cProfile.Profile(), "caller": cProfile.Profile()}
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        ring = Keyring().with_new_tenant("acme")
        save_gateway_keyring(Path(tmp) / "gateway.json", GatewayKeyring.from_keyring(ring))
        rounds = args.repeat * (args.jobs * 2 + args.single + 2 * args.batch + 2)
        env = bench_env(
            Path(tmp),
            server.url,
            keyring=ring,
            MAAS_GATEWAY_KEYRING=str(Path(tmp) / "gateway.json"),
            MAAS_MODEL_DIR=str(Path(tmp) / "models"),
            MAAS_MAX_QUEUE_DEPTH=str(2 * rounds + 100),
            MAAS_GATEWAY_MAX_BATCH=str(args.batch),
        )
        settings = Settings.from_env(env)
        args.redis_pid = server.pid
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        serve = ["gateway", "--port", str(port), "--log-level", "warning"]
        if args.profile:
            gw_prof = str(Path(args.profile).resolve() / "gateway.prof")
            cmd = [sys.executable, __file__, "--serve-profiled", gw_prof, *serve]
        else:
            cmd = [sys.executable, "-m", "maas_worker", *serve]
        proc = subprocess.Popen(cmd, env=env)
        ds: list[dict[str, Any]] = []
        gs: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(url + "/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway did not start")
                time.sleep(0.1)
            for _ in range(args.repeat):
                ds.append(asyncio.run(direct(settings, args)))
                gs.append(asyncio.run(gateway(port, Sealer(ring), args, proc)))
        finally:
            proc.terminate()
            proc.wait(10)
        redis.Redis.from_url(server.url).close()
    cols = [
        ("p50", "p50 ms", "{:.2f}"),
        ("p99", "p99 ms", "{:.2f}"),
        ("concurrent", f"submits/s, {args.concurrency} concurrent", "{:.0f}"),
        ("batched", f"submits/s, batches of {args.batch}", "{:.0f}"),
    ]
    cols = [c for c in cols if c[0] in ds[0]]
    print(f"\n{args.repeat} round(s) of each path; median [min-max]:")
    print("| path | " + " | ".join(c[1] for c in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for name, runs in (("direct AsyncClient", ds), ("through the gateway", gs)):
        cells = []
        for key, _, fmt in cols:
            values = [r[key] for r in runs]
            cells.append(
                _median(values) if fmt == "{:.0f}" else fmt.format(statistics.median(values))
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "p50" in ds[0]:
        added = statistics.median(g["p50"] - d["p50"] for d, g in zip(ds, gs, strict=True))
        print(f"added p50 (median of rounds): {added:.2f} ms")
    if "batched" in ds[0]:
        ratios = [g["batched"] / d["batched"] for d, g in zip(ds, gs, strict=True)]
        print(
            "batched, gateway / direct, each round: "
            + ", ".join(f"{r:.2f}" for r in ratios)
            + f"; median {statistics.median(ratios):.2f}"
        )
    if "batched" in ds[0]:
        print("CPU per job, batched (us, user + system; median of rounds):")
        for name, runs, parts in (
            ("direct AsyncClient", ds, ("client", "Valkey")),
            ("through the gateway", gs, ("caller", "gateway", "Valkey")),
        ):
            each = [statistics.median(r["cpu"][i] for r in runs) for i in range(len(parts))]
            total = statistics.median(sum(r["cpu"]) for r in runs)
            detail = " + ".join(f"{p} {v:.1f}" for p, v in zip(parts, each, strict=True))
            print(f"  {name}: {total:.1f} ({detail})")
    if args.spy:
        report_spy(args.spy)
    if args.profile:
        out = Path(args.profile)
        for side, prof in args.profilers.items():
            prof.dump_stats(out / f"{side}.prof")
        time.sleep(0.5)  # the gateway wrote its file at SIGUSR2; it has exited by now
        jobs = args.jobs * args.repeat
        d_us = report_profile(out / "direct.prof", jobs, args.top, "direct AsyncClient.submit_many")
        c_us = report_profile(out / "caller.prof", jobs, args.top, "gateway's caller")
        g_us = report_profile(out / "gateway.prof", jobs, args.top, "gateway process")
        print(
            f"\nprofiled own time per job: direct {d_us:.1f} us; through the gateway "
            f"{c_us + g_us:.1f} us (caller {c_us:.1f} + gateway {g_us:.1f})"
        )


if __name__ == "__main__":
    main()
