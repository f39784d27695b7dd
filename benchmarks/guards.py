"""Micro-benchmark: what the worker's checks on untrusted input cost per job.

Not a test. The tenant-isolation checks added work to every job message on
the worker: the queue entry is parsed with a depth bound
(`queue_entries.parse_entry`), its body decoded and checked as a task call
(`check_message`), its Celery headers replaced (`sanitize_headers`), and a
job's decrypted input parsed with size and depth bounds (`jsonlimits.loads`).
Each is timed against what the worker did before in its place (a plain
``json.loads`` of the entry, a base64 validation of the body, nothing, a
plain ``json.loads`` of the input), on a real 1 KiB job message built by
Celery's own ``send_task``; and the bounded parse of hostile inputs (1 MiB
of ``[],`` and of ``[``) shows what an attacker can make a worker spend.
Medians of 5 ``timeit`` repeats, in microseconds.

    .venv/bin/python benchmarks/guards.py
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import platform
import statistics
import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from celery import Celery
from kombu.transport import memory

from maas_worker import jsonlimits
from maas_worker.broker.entries import (
    check_message,
    max_body_chars,
    parse_entry,
    sanitize_headers,
)
from maas_worker.protocol import ARGS_REPR, TASK_NAME
from maas_worker.settings import Settings

QUEUE = "maas.normal"
JOB = "0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c"


def median_us(fn: Any, number: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def job_message(input_bytes: int) -> str:
    """A queue entry as it sits in Redis: Celery's message around a sealed ~1 KiB job."""
    app = Celery("guards-bench", broker="memory://", set_as_current=False)
    envelope = base64.b64encode(os.urandom(input_bytes + 150)).decode()
    app.send_task(
        TASK_NAME, args=[envelope], task_id=JOB, queue=QUEUE, argsrepr=ARGS_REPR, kwargsrepr="{}"
    )
    entry = memory.Channel.queues.pop(QUEUE).get_nowait()
    app.close()
    return json.dumps(entry)


def old_check(raw: dict[str, Any]) -> None:
    # What the check did with the body before: validate the base64, nothing more.
    with contextlib.suppress(binascii.Error, ValueError):
        base64.b64decode(raw["body"], validate=True)


def main() -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    limit = max_body_chars(Settings.from_env({}))
    text = job_message(1024)
    raw = json.loads(text)
    inputs = json.dumps({"data": "x" * 1000, "rows": [[0.5] * 8] * 2}).encode()
    n = 20_000
    rows = [
        (
            "parse the queue entry",
            median_us(lambda: json.loads(text), n),
            median_us(lambda: parse_entry(text, max_chars=limit), n),
        ),
        (
            "check the message (body)",
            median_us(lambda: old_check(raw), n),
            median_us(lambda: check_message(raw, QUEUE, max_body_chars=limit), n),
        ),
        (
            "replace Celery's headers",
            0.0,
            median_us(lambda: sanitize_headers(dict(raw), max_eta_s=300), n),
        ),
        (
            "parse the job's input",
            median_us(lambda: json.loads(inputs), n),
            median_us(lambda: jsonlimits.loads(inputs, max_depth=jsonlimits.MAX_INPUT_DEPTH), n),
        ),
    ]
    print(f"\nper 1 KiB job, us (median of 5 repeats of {n}):")
    print(f"  {'step':<28} {'before':>8} {'now':>8} {'added':>8}")
    for name, before, now in rows:
        print(f"  {name:<28} {before:8.2f} {now:8.2f} {now - before:8.2f}")
    added = sum(now - before for _, before, now in rows)
    print(f"  {'total added':<28} {'':>8} {'':>8} {added:8.2f}")

    wide = b"[" + b"[]," * ((1 << 20) // 3 - 1) + b"[]]"
    deep = b"[" * (1 << 20)
    # The most passes of the depth measure: groups exactly as deep as allowed.
    group = b"[" * (jsonlimits.MAX_INPUT_DEPTH - 1) + b"]" * (jsonlimits.MAX_INPUT_DEPTH - 1)
    deepest = b"[" + b",".join([group] * ((1 << 20) // (len(group) + 1))) + b"]"

    def refuse(data: bytes) -> None:
        with contextlib.suppress(ValueError):
            jsonlimits.loads(data, max_depth=jsonlimits.MAX_INPUT_DEPTH)

    print("\nhostile 1 MiB inputs, ms (median of 5 repeats of 3):")
    print(
        f"  {len(wide) // 3:,} sibling arrays ('[],' x N), parsed:   "
        f"{median_us(lambda: refuse(wide), 3) / 1000:8.2f}"
    )
    print(
        f"  1 MiB of '[' (refused at depth {jsonlimits.MAX_INPUT_DEPTH + 1}):       "
        f"{median_us(lambda: refuse(deep), 3) / 1000:8.2f}"
    )
    print(
        f"  1 MiB of groups {jsonlimits.MAX_INPUT_DEPTH} deep, parsed:       "
        f"{median_us(lambda: refuse(deepest), 3) / 1000:8.2f}"
    )
    print(
        f"  the same, plain json.loads (no bound):     "
        f"{median_us(lambda: json.loads(deepest), 3) / 1000:8.2f}"
    )


if __name__ == "__main__":
    main()
