"""Benchmark: the fair-share take against the single-list take it replaced.

Not a test. One embedded Valkey, one connection, takes sent one at a time
(``EVALSHA``, as a consumer polls): per take, the client's round trip (us),
the server's time inside the script (``INFO commandstats``, the ``evalsha``
usec per call: Redis CPU per job taken) and the commands the script ran
(``redis.call``s, counted by commandstats under their own names: the part of
the cost a busy shared machine does not blur), median of ``--repeat`` runs
of ``--takes`` takes each, against a ``PING`` on the same connection:

* ``single list``: the take before fair share (its script is kept below, as
  it was), all jobs in ``maas.normal``;
* ``fair, N tenants``: this version's take (fetch.py), ``N`` tenants with jobs
  queued in ``maas.normal.<tenant>``, every one of them in the ring and with
  work left throughout (so each take rotates the ring: the worst case, weight
  1), for N = 1, 10, 1,000, 10,000;
* ``fair, old list``: this version's take on jobs queued in the old single
  list (the migration path).

Each take asks for the three priorities (high and low empty), as a worker does.
Messages are 1 KiB kombu-shaped JSON with unique delivery tags (reserved in
the unacked hash, as in production).

    .venv/bin/python benchmarks/fairshare.py [--repeat 3] [--takes 5000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from maas_worker.broker import fetch
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.protocol import QUEUE_NAMES

NORMAL = "maas.normal"
TENANTS = (1, 10, 1_000, 10_000)
PAD = "x" * 800

#: The take before fair share (broker/lua/pop_reserve.lua as it was), for the baseline.
SINGLE_LIST_TAKE = """
local out = {}
local want = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[3])
for i = 3, #KEYS do
  while #out < want * 3 do
    local msg = redis.call('RPOP', KEYS[i])
    if not msg then break end
    local reserved_as = ''
    if #msg <= maxlen and string.sub(ARGV[6], i - 2, i - 2) == '1' then
      local ok, m = pcall(cjson.decode, msg)
      local tag = ok and type(m) == 'table' and type(m.properties) == 'table'
                  and m.properties.delivery_tag
      if type(tag) == 'string' and tag ~= '' then
        local q = string.sub(KEYS[i], #ARGV[5] + 1)
        local sep = string.find(q, ARGV[4], 1, true)
        if sep then q = string.sub(q, 1, sep - 1) end
        redis.call('HSET', KEYS[1], tag, '[' .. msg .. ',"",' .. cjson.encode(q) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
        reserved_as = tag
      end
    end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = msg
    out[#out + 1] = reserved_as
  end
  if #out >= want * 3 then break end
end
return out
"""
SINGLE_LIST_SHA = hashlib.sha1(SINGLE_LIST_TAKE.encode(), usedforsecurity=False).hexdigest()


def message(tag: str) -> str:
    """A queue entry laid out as kombu and the clients write one (properties last,
    its delivery tag last: where the take reads it without decoding)."""
    return json.dumps(
        {
            "body": PAD,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "maas.infer", "id": tag, "retries": 0},
            "properties": {
                "correlation_id": tag,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "maas.normal"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": tag,
            },
        }
    )


def single_list_command() -> list[Any]:
    lists = fetch.expand(list(QUEUE_NAMES))
    keys = [fetch.UNACKED_KEY, fetch.UNACKED_INDEX_KEY, *lists]
    return [
        "EVALSHA",
        SINGLE_LIST_SHA,
        len(keys),
        *keys,
        1,
        repr(time.time()),
        1 << 20,
        fetch.PRIORITY_SEP,
        "",
        "1" * len(lists),
    ]


def fair_command() -> list[Any]:
    return fetch.command(list(QUEUE_NAMES), count=1, max_chars=1 << 20, by_sha=True)


def fill(r: redis.Redis, tenants: int, takes: int) -> None:
    """``tenants`` tenants (0: the old single list) with enough jobs that none runs out."""
    r.flushall()
    per = takes // max(tenants, 1) + 2 if tenants else takes + 2
    pipe = r.pipeline(transaction=False)
    for n, t in enumerate(range(max(tenants, 1)), 1):
        key = NORMAL if not tenants else fetch.tenant_queue(NORMAL, f"t{t}")
        pipe.lpush(key, *(message(f"{t}-{i}") for i in range(per)))
        if tenants:
            pipe.sadd(fetch.arrivals_key(NORMAL), f"t{t}")
        if n % 500 == 0:
            pipe.execute()
    pipe.execute()


def server_stats(r: redis.Redis, takes: int) -> tuple[float, float]:
    """(us per ``EVALSHA``, commands the script ran per take) since the last reset."""
    stats = r.info("commandstats")
    us = float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))
    # Commands a script runs are counted under their own names.
    inner = sum(
        int(v["calls"])
        for k, v in stats.items()
        if k not in ("cmdstat_evalsha", "cmdstat_config|resetstat")
    )
    return us, inner / takes


def run(r: redis.Redis, command: list[Any], takes: int) -> tuple[float, float, float]:
    """(client us per take, server us per take, commands per take) over ``takes`` takes."""
    r.config_resetstat()
    t = time.perf_counter()
    for _ in range(takes):
        reply = r.execute_command(*command)  # type: ignore[no-untyped-call]
        assert reply, "ran out of jobs"
    client_us = (time.perf_counter() - t) / takes * 1e6
    return (client_us, *server_stats(r, takes))


def once(r: redis.Redis, tenants: int | None, takes: int) -> tuple[float, float, float]:
    """One run: fill, admit every tenant (the steady state), time ``takes`` takes."""
    fill(r, tenants or 0, takes)
    r.script_load(SINGLE_LIST_TAKE)
    r.script_load(fetch.POP_RESERVE)
    if tenants is None:
        return run(r, single_list_command(), takes)
    command = fair_command()
    while r.scard(fetch.arrivals_key(NORMAL)):  # 16 arrivals admitted per take
        r.execute_command(*command)  # type: ignore[no-untyped-call]
    # (A tenant served twice while the ring was still filling may have run out:
    # newcomers join at the back. A handful, at 1,000 and more.)
    ring = r.llen(fetch.ring_key(NORMAL))
    assert ring >= 0.99 * (tenants or 0), (tenants, ring)
    return run(r, command, takes)


def ping_us(r: redis.Redis, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        r.ping()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--takes", type=int, default=5000)
    args = ap.parse_args()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {args.takes} takes x {args.repeat} runs (median)"
    )
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        version = r.info("server").get("valkey_version") or r.info("server")["redis_version"]
        print(f"server: {version}")
        ping = statistics.median(ping_us(r, args.takes) for _ in range(args.repeat))
        configs: list[tuple[str, int | None]] = [
            ("single list (before fair share)", None),
            ("fair, old single list (migration)", 0),
            *((f"fair, {n:,} tenant(s) with work", n) for n in TENANTS),
        ]
        # Every configuration once per round, so a slower minute of a shared
        # machine falls on all of them alike.
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in configs}
        for _ in range(args.repeat):
            for name, tenants in configs:
                runs[name].append(once(r, tenants, args.takes))
        rows = [
            (
                name,
                {
                    "client_us": statistics.median(c for c, _, _ in runs[name]),
                    "server_us": statistics.median(s for _, s, _ in runs[name]),
                    "commands": statistics.median(n for _, _, n in runs[name]),
                },
            )
            for name, _ in configs
        ]
        base = rows[0][1]
        print(f"\nPING: {ping:.1f} us")
        print(
            "| take | us per take (client) | / single list | Redis us per take | / single list"
            " | commands per take |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, row in rows:
            print(
                f"| {name} | {row['client_us']:.1f} | {row['client_us'] / base['client_us']:.2f}"
                f" | {row['server_us']:.2f} | {row['server_us'] / base['server_us']:.2f}"
                f" | {row['commands']:.2f} |"
            )
        r.close()


if __name__ == "__main__":
    main()
