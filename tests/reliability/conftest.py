"""Reliability suite: faults, fuzzing, load, no loss and no leak (docs/reliability.md).

Every stack here runs on its own embedded Valkey server (never a shared one:
the tests restart it, and the leak scan reads every database), with three
tenants and real worker processes. ``MAAS_RELIABILITY_SCALE`` picks the size:
``small`` (the default, part of ``make test``) or ``full`` (``make
reliability``). Each test reports its figures (jobs, faults, fuzz cases,
lost, duplicated, leaks); they are printed at the end of the run and kept in
pytest's cache under ``maas/reliability`` for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.tenancy.keyring import Keyring, save_keyring

from ..integration.conftest import Stack, wait_for

__all__ = ["SIZE", "TENANTS", "Stack", "assert_once", "outcome_counts", "wait_for"]

TENANTS = ("acme", "globex", "initech")
SCALE = os.environ.get("MAAS_RELIABILITY_SCALE", "small")
if SCALE not in ("small", "full"):
    raise pytest.UsageError("MAAS_RELIABILITY_SCALE must be small or full")


@dataclass(frozen=True)
class Size:
    """How much each scenario does at one scale."""

    kill_jobs: int  # jobs in flight when a worker is SIGKILLed
    kill_rounds: int  # workers killed one after another
    shutdown_jobs: int  # jobs in flight when a worker gets SIGTERM
    restart_jobs: int  # jobs accepted around a Redis restart
    restarts: int  # Redis restarts in one run
    fuzz_envelope: int  # hypothesis examples, envelope opening
    fuzz_task: int  # hypothesis examples, the task entry point
    fuzz_result: int  # hypothesis examples, a client opening a result
    fuzz_queue: int  # hypothesis examples, the transport's queue guard
    load_jobs: int  # scenario 6
    huge_body_mb: int  # the hostile oversized message
    failover_jobs: int  # jobs accepted around Sentinel failovers
    failovers: int  # primaries killed in one run (the old one returning each time)


SIZES = {
    "small": Size(
        kill_jobs=60,
        kill_rounds=1,
        shutdown_jobs=40,
        restart_jobs=150,
        restarts=1,
        fuzz_envelope=600,
        fuzz_task=300,
        fuzz_result=300,
        fuzz_queue=300,
        load_jobs=600,
        huge_body_mb=8,
        failover_jobs=150,
        failovers=1,
    ),
    "full": Size(
        kill_jobs=400,
        kill_rounds=3,
        shutdown_jobs=300,
        restart_jobs=2000,
        restarts=3,
        fuzz_envelope=6000,
        fuzz_task=3000,
        fuzz_result=2000,
        fuzz_queue=2000,
        load_jobs=10_000,
        huge_body_mb=64,
        failover_jobs=2000,
        failovers=2,
    ),
}
SIZE = SIZES[SCALE]

_figures: dict[str, dict[str, Any]] = {}


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``report(**figures)``: record this test's figures for the run summary."""

    def add(**figures: Any) -> None:
        _figures.setdefault(request.node.name, {}).update(figures)

    return add


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _figures:
        return
    terminalreporter.section(f"reliability figures (scale {SCALE})")
    for name, figures in _figures.items():
        terminalreporter.write_line(f"{name}: {json.dumps(figures, sort_keys=True)}")
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        cache.set("maas/reliability", {"scale": SCALE, "at": time.time(), "tests": _figures})


def make_keyring() -> Keyring:
    ring = Keyring()
    for tenant in TENANTS:
        ring = ring.with_new_tenant(tenant)
    return ring


@pytest.fixture
def make_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., tuple[Stack, EmbeddedRedis]]]:
    """Factory: ``make_stack(appendonly=False, **env)`` -> (`Stack`, its own server)."""
    made: list[tuple[Stack, EmbeddedRedis]] = []

    def factory(
        *, appendonly: bool = False, server_args: tuple[str, ...] = (), **extra_env: str
    ) -> tuple[Stack, EmbeddedRedis]:
        tmp = tmp_path_factory.mktemp("rstack")
        server = EmbeddedRedis(appendonly=appendonly, extra_args=server_args).start()
        keyring_path = tmp / "keyring.json"
        save_keyring(keyring_path, make_keyring())
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(
            {
                "MAAS_BROKER_URL": server.url,
                "MAAS_KEYRING": str(keyring_path),
                "MAAS_DIAGNOSTIC_MODELS": "1",
                "MAAS_TENANT": TENANTS[0],
                "MAAS_MODEL_DIR": str(tmp / "models"),
                "MAAS_METRICS_PORT": "0",
                **extra_env,
            }
        )
        stack = Stack(server.url, tmp, keyring_path, env, redis.Redis.from_url(server.url))
        made.append((stack, server))
        return stack, server

    yield factory
    for stack, server in made:
        for w in stack.workers:
            w.stop(timeout_s=5)
        stack.backend.close()
        server.stop()


_OUTCOME = re.compile(r"job '([^']+)' (\w+)\n")


def outcome_counts(logs: str) -> dict[str, Counter[str]]:
    """Per job id, how many times each outcome was logged by the workers."""
    counts: dict[str, Counter[str]] = {}
    for job_id, outcome in _OUTCOME.findall(logs):
        counts.setdefault(job_id, Counter())[outcome] += 1
    return counts


def assert_once(stack: Stack, jobs: list[Any]) -> dict[str, Counter[str]]:
    """Each job (all have a stored result) completed one run, never two.

    A worker logs ``succeeded`` just after storing the result; if it died or
    lost Redis in between, the job's next delivery logs ``replayed`` instead,
    so a job has one ``succeeded`` line, or none and a ``replayed`` one. A
    ``duplicate`` line would be a second completed run (its result discarded
    by the write-once store): that must never happen.
    """

    def all_logged() -> dict[str, Counter[str]] | None:
        counts = outcome_counts(stack.worker_logs())
        ok = all(
            counts.get(j.id, Counter())["succeeded"] or counts.get(j.id, Counter())["replayed"]
            for j in jobs
        )
        return counts if ok else None

    counts: dict[str, Counter[str]] = wait_for(all_logged, 60.0, "every job's outcome line")
    assert {
        j.id: counts[j.id]
        for j in jobs
        if counts[j.id]["succeeded"] > 1 or counts[j.id]["duplicate"]
    } == {}
    return counts


def read_logs(paths: list[Path]) -> str:
    return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())
