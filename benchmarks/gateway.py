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
  ``POST /v1/jobs:batch`` of as many envelopes, one after the other.

    .venv/bin/python benchmarks/gateway.py [--single 2000] [--jobs 20000] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maas_worker import AsyncClient
from maas_worker.crypto.envelope import Header, now_ms, seal
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.settings import Settings
from maas_worker.tenancy.gatekeys import GatewayKeyring, bearer_token, save_gateway_keyring
from maas_worker.tenancy.keyring import Keyring, save_keyring


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


async def direct(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with AsyncClient(settings=settings) as client:
        await client.submit("echo", {"warm": 1})
        times = []
        for n in range(args.single):
            t = time.perf_counter()
            await client.submit("echo", {"n": n})
            times.append(time.perf_counter() - t)
        out["p50"], out["p99"] = _pct(times, 50), _pct(times, 99)

        async def one(n: int) -> None:
            await client.submit("echo", {"n": n})

        t = time.perf_counter()
        for start in range(0, args.jobs, args.concurrency):
            await asyncio.gather(*(one(n) for n in range(start, start + args.concurrency)))
        out["concurrent"] = args.jobs / (time.perf_counter() - t)
        t = time.perf_counter()
        for start in range(0, args.jobs, args.batch):
            await client.submit_many("echo", [{"n": n} for n in range(start, start + args.batch)])
        out["batched"] = args.jobs / (time.perf_counter() - t)
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


async def gateway(port: int, sealer: Sealer, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    conns = [await Conn.open(port) for _ in range(args.concurrency)]

    async def one(conn: Conn, n: int) -> None:
        status, body = await conn.post(
            "/v1/jobs", sealer.seal(n), "application/octet-stream", sealer.token
        )
        assert status == 202, body

    await one(conns[0], -1)
    times = []
    for n in range(args.single):
        t = time.perf_counter()
        await one(conns[0], n)
        times.append(time.perf_counter() - t)
    out["p50"], out["p99"] = _pct(times, 50), _pct(times, 99)
    t = time.perf_counter()
    for start in range(0, args.jobs, args.concurrency):
        await asyncio.gather(*(one(c, start + i) for i, c in enumerate(conns)))
    out["concurrent"] = args.jobs / (time.perf_counter() - t)
    t = time.perf_counter()
    for start in range(0, args.jobs, args.batch):
        envelopes = [
            base64.b64encode(sealer.seal(n)).decode() for n in range(start, start + args.batch)
        ]
        doc = json.dumps({"envelopes": envelopes}).encode()
        status, body = await conns[0].post("/v1/jobs:batch", doc, "application/json", sealer.token)
        assert status == 200 and all(i["status"] == 202 for i in json.loads(body)["items"])
    out["batched"] = args.jobs / (time.perf_counter() - t)
    for c in conns:
        c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", type=int, default=2000, help="sequential submits timed")
    ap.add_argument("--jobs", type=int, default=20_000, help="jobs for each throughput figure")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        ring = Keyring().with_new_tenant("acme")
        save_keyring(Path(tmp) / "keyring.json", ring)
        save_gateway_keyring(Path(tmp) / "gateway.json", GatewayKeyring.from_keyring(ring))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(
            MAAS_BROKER_URL=server.url,
            MAAS_KEYRING=str(Path(tmp) / "keyring.json"),
            MAAS_GATEWAY_KEYRING=str(Path(tmp) / "gateway.json"),
            MAAS_TENANT="acme",
            MAAS_DIAGNOSTIC_MODELS="1",
            MAAS_MODEL_DIR=str(Path(tmp) / "models"),
            MAAS_MAX_QUEUE_DEPTH=str(10 * (args.jobs + args.single) + 100),
            MAAS_GATEWAY_MAX_BATCH=str(args.batch),
        )
        settings = Settings.from_env(env)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "maas_worker", "gateway", "--port", str(port),
             "--log-level", "warning"],
            env=env,
        )  # fmt: skip
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
            d = asyncio.run(direct(settings, args))
            g = asyncio.run(gateway(port, Sealer(ring), args))
        finally:
            proc.terminate()
            proc.wait(10)
        redis.Redis.from_url(server.url).close()
    print(
        f"| path | p50 ms | p99 ms | submits/s, {args.concurrency} concurrent | "
        f"submits/s, batches of {args.batch} |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, f in (("direct AsyncClient", d), ("through the gateway", g)):
        print(
            f"| {name} | {f['p50']:.2f} | {f['p99']:.2f} | {f['concurrent']:.0f} "
            f"| {f['batched']:.0f} |"
        )
    print(f"added p50: {g['p50'] - d['p50']:.2f} ms")


if __name__ == "__main__":
    main()
