"""The environment benchmarks/stack.py gives every benchmark (no server, no timing).

Each benchmark's figures depend on its settings alone: these pin what
`bench_env` sets, what it drops from the caller's shell and the keyring it writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.stack import bench_env
from maas_worker.tenancy.keyring import Keyring, load_keyring


def test_bench_env_drops_the_callers_maas_variables_and_sets_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAAS_WORKER_MODE", "celery-tasks")
    monkeypatch.setenv("MAAS_TENANT", "someone-else")
    monkeypatch.setenv("BENCH_STACK_KEPT", "yes")
    env = bench_env(tmp_path, "redis://127.0.0.1:1/0", MAAS_MAX_QUEUE_DEPTH="8")
    assert {k: v for k, v in env.items() if k.startswith("MAAS_")} == {
        "MAAS_BROKER_URL": "redis://127.0.0.1:1/0",
        "MAAS_KEYRING": str(tmp_path / "keyring.json"),
        "MAAS_TENANT": "acme",
        "MAAS_DIAGNOSTIC_MODELS": "1",
        "MAAS_MAX_QUEUE_DEPTH": "8",
    }
    assert env["BENCH_STACK_KEPT"] == "yes"
    assert set(load_keyring(tmp_path / "keyring.json").tenants) == {"acme"}


def test_bench_env_tenant_keyring_and_diagnostic_models(tmp_path: Path) -> None:
    env = bench_env(tmp_path, "redis://x", tenant="bench", diagnostic_models=False)
    assert env["MAAS_TENANT"] == "bench"
    assert "MAAS_DIAGNOSTIC_MODELS" not in env
    assert set(load_keyring(tmp_path / "keyring.json").tenants) == {"bench"}

    ring = Keyring().with_new_tenant("acme")
    bench_env(tmp_path, "redis://x", keyring=ring)
    assert load_keyring(tmp_path / "keyring.json").to_json() == ring.to_json()
