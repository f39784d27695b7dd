"""The per-envelope steps every submit and check runs, each alone (us per job).

What docs/benchmarks.md ("Parity with batches in flight") quotes for the
header parse, `verify`, the queue entries and the packing of a batch's
commands. 1 KiB envelopes, batches of 500, best of ``--rounds`` rounds (the
least disturbed by other work on the machine). To compare with an older tree,
run this file from its export::

    git -C /work/main archive <commit> | tar -x -C /tmp/base
    cd /tmp/base && PYTHONPATH=/tmp/base /work/main/.venv/bin/python \\
        /work/main/benchmarks/hotpath.py

(The packing rows compare redis-py's own packer with the connections of the tree
run, in the same process.)
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Callable

import redis.asyncio

from maas_worker.backend import redis as our_redis
from maas_worker.client import markers
from maas_worker.client.wire import MessageBuilder
from maas_worker.crypto.envelope import Header, now_ms, parse_unverified_header, seal, verify
from maas_worker.tenancy.gatekeys import GatewayKey, GatewayKeyring, GatewayTenant

BATCH = 500


class _Keys:
    request_enc = os.urandom(32)
    result_enc = os.urandom(32)
    mac = os.urandom(32)


def best_us(fn: Callable[[], object], calls: int, per: int, rounds: int) -> float:
    """The fastest round's time per item (us)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls / per * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    now = now_ms()
    sealed = []
    for _ in range(BATCH):
        header = Header(
            "request", 1, now, now + 3_600_000, "normal", "acme", str(uuid.uuid4()),
            "maas.infer", "echo",
        )  # fmt: skip
        sealed.append((header, seal(_Keys, header, os.urandom(1024))))
    raw = sealed[0][1]
    ring = GatewayKeyring(
        {"acme": GatewayTenant("acme", (GatewayKey(1, "primary", _Keys.mac, b"\0" * 32),))}
    )
    builder = MessageBuilder()
    entries = builder.messages("acme", sealed, "maas.normal")
    claim = markers.claim("acme", [(h, "0" * 64, 3600) for h, _ in sealed], 86_400)
    fcall = ("FCALL", "maas_v2_mark_queued", len(claim.keys), *claim.keys, *claim.args)
    push = ("LPUSH", "maas.normal.acme", *entries)
    theirs, ours = redis.asyncio.Connection(), our_redis._AsyncConnection()
    r = args.rounds
    rows = [
        ("parse_unverified_header", best_us(lambda: parse_unverified_header(raw), 20_000, 1, r)),
        (
            "verify (gateway keyring)",
            best_us(
                lambda: verify(raw, expect="request", keyring=ring, max_bytes=1 << 20),
                20_000,
                1,
                r,
            ),
        ),
        (
            "MessageBuilder.messages",
            best_us(lambda: builder.messages("acme", sealed, "maas.normal"), 40, BATCH, r),
        ),
        ("pack the push, redis-py", best_us(lambda: theirs.pack_command(*push), 40, BATCH, r)),
        ("pack the push, this tree", best_us(lambda: ours.pack_command(*push), 40, BATCH, r)),
        (
            "pack the markers' FCALL, redis-py (per argument)",
            best_us(lambda: theirs.pack_command(*fcall), 40, len(fcall), r),
        ),
        (
            "pack the markers' FCALL, this tree (per argument)",
            best_us(lambda: ours.pack_command(*fcall), 40, len(fcall), r),
        ),
    ]
    print(f"1 KiB envelopes, batches of {BATCH}, best of {r} rounds; us per job")
    for name, us in rows:
        print(f"  {name:52s} {us:6.2f}")


if __name__ == "__main__":
    main()
