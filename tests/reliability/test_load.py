"""Scenarios 6 and 7: load through two worker nodes, then no loss, no duplicate, no leak.

Jobs of three tenants at every priority go through two worker nodes, with
Flower watching. Every job must come back exactly once, opening with its own
tenant's key and holding what was sent (a result of another tenant, or of
another job, would not open). Pool processes must not grow without bound,
and once results and replay markers have expired Redis must hold about what
it held before the run. Then nothing may leak: no input or output marker
and no key material in any key of any database, in Flower's API, or in the
worker and Flower logs.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
import urllib.request
from typing import Any

import psutil
import pytest

from maas_worker.backend import keyspace
from maas_worker.client.client import Job
from maas_worker.crypto.envelope import open_envelope
from maas_worker.errors import InvalidEnvelope
from maas_worker.local.demo import scan_for
from maas_worker.local.embedded import free_port
from maas_worker.local.processes import WorkerProcess
from maas_worker.tenancy.keyring import load_keyring

from ..integration.services import Service
from .conftest import SCALE, SIZE, TENANTS, Stack, assert_once, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]
PRIORITIES = ("high", "normal", "low")
BATCH = 250
FLOWER_USER, FLOWER_PASSWORD = "ops", "reliability-flower-password"
#: Jobs must be able to wait this long in the queue: the whole run, with room.
JOB_TTL_S = 15 if SCALE == "small" else 120
#: A result must outlive the wait between being stored and being read (the run).
RESULT_TTL_S = 10 if SCALE == "small" else 60
SKEW_S = 2


def flower_get(port: int, path: str) -> tuple[int, str]:
    token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Basic {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


def pool_rss(workers: list[WorkerProcess]) -> dict[int, int]:
    """Resident memory (bytes) of every pool process of ``workers``, by pid."""
    out = {}
    for w in workers:
        assert w.proc is not None
        for child in psutil.Process(w.proc.pid).children():
            out[child.pid] = child.memory_info().rss
    return out


def key_material(stack: Stack) -> list[bytes]:
    """Every form in which a tenant secret or derived key could show up in text."""
    ring = load_keyring(stack.keyring_path)
    out: list[bytes] = []
    for tenant in TENANTS:
        kv = ring.tenant(tenant).primary()
        keys = kv.keys(tenant)
        for raw in (kv.secret, keys.mac, keys.request_enc, keys.result_enc):
            out += [
                raw,
                raw.hex().encode(),
                base64.b64encode(raw),
                base64.urlsafe_b64encode(raw),
                base64.b64encode(raw).rstrip(b"="),
            ]
    return out


#: Keys under ``maas:`` that are not a job's: a tenant's quota state, a node's sample.
_NOT_JOB_KEY = re.compile(rb"maas:\{[^}]*\}:(?:bucket|inflight|pending)|maas:sample:.*")


def job_keys(stack: Stack) -> int:
    """Keys that belong to jobs (all of them expire)."""
    return sum(
        1
        for key in stack.backend.scan_iter("maas:*:*", count=5000)
        if not _NOT_JOB_KEY.fullmatch(key)
    )


def test_load_three_tenants_two_nodes_no_loss_no_duplicate_no_leak(
    make_stack: Any, report: Any
) -> None:
    stack, _ = make_stack(
        MAAS_RESULT_TTL_S=str(RESULT_TTL_S),
        MAAS_CLOCK_SKEW_S=str(SKEW_S),
        MAAS_MAX_QUEUE_DEPTH="1000000",
        MAAS_FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}",
    )
    port = free_port()
    flower = Service(stack, "flower", "flower", "--port", str(port))
    try:
        _run(stack, port, flower, report)
    finally:
        flower.stop()


def _run(stack: Stack, port: int, flower: Service, report: Any) -> None:
    nodes = [stack.start_worker(f"node{i}", concurrency=2) for i in (1, 2)]
    wait_for(lambda: flower_get(port, "/api/workers")[0] == 200, 60, "Flower to answer")
    memory_start = int(stack.backend.info("memory")["used_memory"])
    marker = f"reliability-marker-{time.time_ns()}"
    clients = {t: stack.client(t) for t in TENANTS}
    # Warm-up: every process has loaded what it needs before RSS is measured.
    for job in [clients[t].submit("echo", {"warm": t}, ttl_s=JOB_TTL_S) for t in TENANTS * 20]:
        job.result(timeout=60)
    rss_before = pool_rss(nodes)

    expected: list[tuple[Job, dict[str, Any]]] = []
    combos = itertools.cycle(itertools.product(TENANTS, PRIORITIES))
    started = time.monotonic()
    while len(expected) < SIZE.load_jobs:
        tenant, priority = next(combos)
        inputs = [
            {"m": marker, "t": tenant, "i": len(expected) + i}
            for i in range(min(BATCH, SIZE.load_jobs - len(expected)))
        ]
        jobs = clients[tenant].submit_many("echo", inputs, priority=priority, ttl_s=JOB_TTL_S)
        expected += list(zip(jobs, inputs, strict=True))
    submit_s = time.monotonic() - started

    lost: list[str] = []
    deadline = time.monotonic() + JOB_TTL_S + 60
    for job, sent in expected:
        try:
            out = job.result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            lost.append(f"{job.id}: {type(exc).__name__}")
            continue
        assert out == {"echo": sent}  # opened with its tenant's key, bound to its request
    run_s = time.monotonic() - started
    assert lost == []
    assert run_s < JOB_TTL_S  # the expiry wait below is long enough
    rss_after = pool_rss(nodes)

    # No result opens for another tenant (each client holds only its own key).
    ring = load_keyring(stack.keyring_path)
    crossed = 0
    for job, sent in expected[:: max(1, len(expected) // 300)]:
        sealed = stack.backend.get(keyspace.result(sent["t"], job.id))
        for other in TENANTS:
            if other == sent["t"]:
                continue
            # The other tenant's secret under this tenant's name, too.
            forged = ring.only(other).tenant(other)
            with pytest.raises(InvalidEnvelope):
                open_envelope(sealed, expect="result", keyring=ring.only(other), max_bytes=1 << 20)
            with pytest.raises(InvalidEnvelope):
                open_envelope(
                    sealed, expect="result", keyring=_renamed(forged, sent["t"]), max_bytes=1 << 20
                )
            crossed += 2

    counts = assert_once(stack, [j for j, _ in expected])
    replayed = sum(counts[j.id]["replayed"] for j, _ in expected)

    # -- no leak -------------------------------------------------------------------
    secrets = key_material(stack)
    output_marker = json.dumps({"echo": {"m": marker}}, separators=(",", ":"))[:-2].encode()
    markers = [marker.encode(), output_marker]
    keys_read, hits = scan_for(stack.backend, markers + secrets)
    assert keys_read > SIZE.load_jobs  # results, markers, claims were all there to read
    assert hits == []
    status, tasks_json = flower_get(port, "/api/tasks?limit=100000")
    assert status == 200
    flower_tasks = json.loads(tasks_json)
    seen_by_flower = sum(1 for j, _ in expected if j.id in flower_tasks)
    assert seen_by_flower > 0 and "<sealed envelope>" in tasks_json
    logs = stack.worker_logs() + flower.log()
    assert "succeeded" in logs
    leaks = [
        m
        for m in markers + secrets
        if m.decode(errors="replace") in tasks_json or m.decode(errors="replace") in logs
    ]
    assert leaks == []

    # -- Redis memory after expiry -------------------------------------------------------
    wait_for(
        lambda: job_keys(stack) == 0,
        JOB_TTL_S + RESULT_TTL_S + SKEW_S + 120,
        "every job key to expire",
    )
    memory_end = int(stack.backend.info("memory")["used_memory"])
    growth = {pid: rss_after.get(pid, 0) - rss for pid, rss in rss_before.items()}
    report(
        jobs=len(expected),
        tenants=len(TENANTS),
        nodes=len(nodes),
        submit_s=round(submit_s, 1),
        run_s=round(run_s, 1),
        jobs_per_s=round(len(expected) / run_s),
        lost=len(lost),
        duplicated=0,
        replayed_copies=replayed,
        cross_tenant_opens_refused=crossed,
        redis_keys_scanned=keys_read,
        leaks_found=len(hits) + len(leaks),
        flower_tasks_checked=len(flower_tasks),
        flower_saw_our_jobs=seen_by_flower,
        pool_rss_mb_before=[round(v / 2**20, 1) for v in rss_before.values()],
        pool_rss_growth_mb=[round(v / 2**20, 1) for v in growth.values()],
        redis_used_memory_mb_start=round(memory_start / 2**20, 2),
        redis_used_memory_mb_after_expiry=round(memory_end / 2**20, 2),
    )
    # Bounded: a pool process may settle at a higher plateau, not grow per job.
    assert all(g < 64 * 2**20 for g in growth.values()), growth
    assert memory_end < memory_start + max(4 * 2**20, memory_start // 4)


def _renamed(tenant: Any, name: str) -> Any:
    """A keyring with ``tenant``'s keys filed under ``name`` (a forged key for that tenant)."""
    from dataclasses import replace

    from maas_worker.tenancy.keyring import Keyring

    return Keyring({name: replace(tenant, name=name)})
