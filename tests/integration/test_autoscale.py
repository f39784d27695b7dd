"""The backlog autoscaler in a real prefork worker: grows, shrinks, and respects headroom."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import psutil
import pytest

from maas_worker.local.embedded import free_port

from .conftest import Stack, wait_for
from .services import http_get, pool_size, start_worker

pytestmark = pytest.mark.integration
WAIT_S = 60.0
JOB_S = 1.5


def test_grows_from_min_toward_max_under_a_backlog_and_shrinks_when_idle(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(
        MAAS_AUTOSCALE_KEEPALIVE_S="1",
        MAAS_AUTOSCALE_GROW_AFTER_S="0",
        MAAS_AUTOSCALE_MAX_CPU_PCT="100",
        MAAS_AUTOSCALE_MAX_MEMORY_PCT="100",
        MAAS_METRICS_PORT="0",
    )
    w = start_worker(stack, "auto", extra_args=("--autoscale", "3,1"))
    assert pool_size(w) == 1
    client = stack.client()
    jobs = [client.submit("sleep", {"seconds": JOB_S}) for _ in range(6)]
    submitted = time.monotonic()
    wait_for(lambda: pool_size(w) == 3, WAIT_S, "the pool to grow to MAX=3")
    grown_after = time.monotonic() - submitted
    for job in jobs:
        assert job.result(timeout=WAIT_S)["slept"] >= JOB_S
    done = time.monotonic()
    wait_for(lambda: pool_size(w) == 1, WAIT_S, "the pool to shrink back to MIN=1")
    shrunk_after = time.monotonic() - done
    log = stack.worker_logs()
    assert re.search(r"autoscale: \d -> 3 processes \(backlog", log), log[-3000:]
    assert "autoscale: 3 -> 1 processes (idle" in log
    # six 1.5 s jobs on 1 process would take 9 s; the grown pool runs them in ~3 s
    print(f"grew to 3 after {grown_after:.1f} s, back to 1 {shrunk_after:.1f} s after the last job")


def test_refuses_to_grow_when_memory_use_is_above_the_threshold(
    make_stack: Callable[..., Stack],
) -> None:
    used = psutil.virtual_memory().percent
    threshold = round(used / 2, 1)  # below current use: no headroom
    port = free_port()
    stack = make_stack(
        MAAS_AUTOSCALE_KEEPALIVE_S="1",
        MAAS_AUTOSCALE_GROW_AFTER_S="0",
        MAAS_AUTOSCALE_MAX_CPU_PCT="100",
        MAAS_AUTOSCALE_MAX_MEMORY_PCT=str(threshold),
        MAAS_METRICS_PORT=str(port),
    )
    w = start_worker(stack, "tight", extra_args=("--autoscale", "3,1"))
    client = stack.client()
    jobs = [client.submit("sleep", {"seconds": 1.0}) for _ in range(4)]

    def scaler() -> dict[str, float] | None:
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        if status != 200:
            return None
        values = dict(re.findall(r"^maas_autoscaler_(\w+)\{[^}]*\} (\S+)$", body, re.M))
        return {k: float(v) for k, v in values.items()} or None

    # the backlog calls for 3 processes; the autoscaler says so and stays at 1
    state = wait_for(
        lambda: (s := scaler()) and s.get("desired_pool_size", 0) >= 2 and s,
        WAIT_S,
        "the autoscaler to want more processes",
    )
    assert state["pool_size"] == 1
    assert pool_size(w) == 1
    wait_for(lambda: "no headroom: memory" in stack.worker_logs(), WAIT_S, "the refusal logged")
    for job in jobs:
        job.result(timeout=WAIT_S)
        assert pool_size(w) == 1
    assert "Scaling up" not in stack.worker_logs()
