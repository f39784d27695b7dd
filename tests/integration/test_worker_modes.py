"""Which engine ``maas-worker worker`` runs: batch consumers by default, Celery tasks on request.

Real Valkey, real workers. Each way of choosing a mode (no flag, the kept
``--batch-consumer``, ``--celery-tasks``, ``MAAS_WORKER_MODE``, Celery's
``--autoscale``) is checked where an operator would look: the worker's
children (batch consumer processes or none), its ready line, its ``stats``
reply, and a job that completes. Nodes of the two modes share one deployment
(a rolling update from the old default runs both): every job runs once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil
import pytest

from maas_worker.local.processes import WorkerProcess

from .conftest import WAIT_S, Stack, wait_for

pytestmark = pytest.mark.integration

BATCH = "batch consumer, 2 process(es)"
TASKS = "Celery tasks"


def consumer_children(worker: WorkerProcess) -> list[psutil.Process]:
    """The ``maas-worker batch-consumer`` processes among ``worker``'s children."""
    assert worker.proc is not None
    return [
        c
        for c in psutil.Process(worker.proc.pid).children(recursive=True)
        if "batch-consumer" in c.cmdline()
    ]


def stats_reply(stack: Stack, node: str) -> dict[str, Any]:
    """``node``'s answer to ``stats``, as ``celery inspect stats`` and Flower ask for it."""
    with stack.client() as client:
        replies = client.app.control.broadcast("stats", reply=True, timeout=5, destination=[node])
    [reply] = [r[node] for r in replies if node in r]
    answer: dict[str, Any] = reply
    return answer


def ready_line(worker: WorkerProcess) -> str:
    """The worker's ``maas worker <node> ready (...)`` line (logged once it is announced)."""
    marker = f"maas worker {worker.node} ready ("

    def line() -> str | None:
        text = worker.log_path.read_text(errors="replace")
        return next((ln for ln in text.splitlines() if marker in ln), None)

    found: str = wait_for(line, WAIT_S, f"the ready line of {worker.node}")
    return found


@pytest.mark.parametrize(
    ("args", "env", "mode"),
    [
        ((), {}, BATCH),
        (("--batch-consumer",), {"MAAS_WORKER_MODE": "celery-tasks"}, BATCH),
        (("--celery-tasks",), {}, TASKS),
        ((), {"MAAS_WORKER_MODE": "celery-tasks"}, TASKS),
        (("--autoscale", "2,1"), {}, TASKS),
    ],
    ids=["no-flag", "batch-consumer-flag-over-env", "celery-tasks", "env", "autoscale"],
)
def test_the_worker_runs_the_mode_its_flags_and_environment_choose(
    make_stack: Callable[..., Stack], args: tuple[str, ...], env: dict[str, str], mode: str
) -> None:
    stack = make_stack()
    worker = stack.start_worker("mode", concurrency=2, args=args, env=env)
    with stack.client() as client:
        job = client.submit("echo", {"mode": mode})
        assert job.result(timeout=WAIT_S) == {"echo": {"mode": mode}}
    assert f"ready ({mode}); models: " in ready_line(worker)
    assert stats_reply(stack, worker.node)["worker mode"] == mode
    consumers = consumer_children(worker)
    assert len(consumers) == (2 if mode == BATCH else 0)
    assert stack.outcomes(job.id) == ["succeeded"]


def test_nodes_of_both_modes_serve_one_deployment_and_run_each_job_once(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    old = stack.start_worker("old", concurrency=2, args=("--celery-tasks",))
    new = stack.start_worker("new", concurrency=2)
    assert stats_reply(stack, old.node)["worker mode"] == TASKS
    assert stats_reply(stack, new.node)["worker mode"] == BATCH
    with stack.client() as client:
        jobs = client.submit_many("echo", [{"i": i} for i in range(200)])
        jobs.append(client.submit("sleep", {"seconds": 0.2}, priority="high"))
        outputs = [job.result(timeout=WAIT_S) for job in jobs]
    assert [o["echo"]["i"] for o in outputs[:-1]] == list(range(200))
    for job in jobs:
        assert stack.outcomes(job.id) == ["succeeded"]
