"""``submit --wait`` tells the truth: the job id at once, where the job stands when the
wait ends (timeout, Ctrl-C, Redis gone), and that the job still runs afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
import redis

from .conftest import WAIT_S, Stack, wait_for

pytestmark = pytest.mark.integration
QUEUED_LINE = re.compile(r"job ([0-9a-f-]{36}) queued(; no worker is consuming right now)?\n")


def start_wait(stack: Stack, model: str, inputs: str) -> tuple[subprocess.Popen[str], str, bool]:
    """``submit --wait`` in the background: the process, its job id (read from its first
    stderr line, printed before it waits) and whether it said no worker is consuming."""
    args = ["submit", "--model", model, "--input", inputs, "--wait", "--timeout", str(WAIT_S)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "maas_worker", *args],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    found = QUEUED_LINE.fullmatch(first)
    assert found, first
    return proc, found.group(1), found.group(2) is not None


def test_timeout_says_the_job_is_still_queued_and_no_worker_is_consuming(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    out = stack.cli("submit", "--model", "echo", "--input", "{}", "--wait", "--timeout", "1")
    assert out.returncode == 1 and out.stdout == ""
    first, last = out.stderr.splitlines()
    found = QUEUED_LINE.fullmatch(first + "\n")
    assert found and found.group(2), first
    job_id = found.group(1)
    assert last == (
        f"maas-worker: error: no result within 1 s: job {job_id} is still queued "
        "and no worker is consuming"
    )


def test_ctrl_c_says_where_the_job_stands_and_it_still_runs(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    # No worker: Ctrl-C leaves a queued job, which runs once a worker starts.
    proc, queued, idle = start_wait(stack, "echo", '{"n": 1}')
    assert idle
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130 and stdout == ""
    assert stderr == (
        f"job {queued} is still queued (it will run; maas-worker cancel {queued} to stop it)\n"
    )
    stack.start_worker()
    res = stack.cli("result", queued, "--timeout", str(WAIT_S))
    assert (res.returncode, json.loads(res.stdout)) == (0, {"echo": {"n": 1}}), res.stderr

    # A running job: a timeout and Ctrl-C both say it is running, and on which fleet.
    proc, running, idle = start_wait(stack, "sleep", '{"seconds": 60}')
    assert not idle
    job = stack.client().job(running)
    wait_for(lambda: job.status() == "running", WAIT_S, "the sleep job to start")
    late = stack.cli("result", running, "--timeout", "0.5")
    assert late.returncode == 1
    assert late.stderr == (
        f"maas-worker: error: no result within 0.5 s: job {running} is still running "
        "(1 worker live)\n"
    )
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130
    assert stderr == (
        f"job {running} is still running (it will finish; maas-worker cancel {running} "
        "to stop it)\n"
    )
    assert stack.cli("cancel", running).returncode == 0


@pytest.mark.skipif(
    bool(os.environ.get("MAAS_TEST_REDIS_URL")), reason="stops the Redis server it uses"
)
def test_redis_going_away_while_waiting_names_the_job(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    proc, job_id, _ = start_wait(stack, "echo", "{}")
    with contextlib.suppress(redis.ConnectionError):
        stack.backend.shutdown(nosave=True)
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 1 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"maas-worker: error: job {job_id}: result backend unavailable")
