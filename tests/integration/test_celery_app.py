"""``celery -A maas_worker.app worker`` runs jobs as ``maas-worker worker`` does."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from maas_worker.local.processes import WorkerProcess
from maas_worker.protocol import QUEUE_NAMES
from tests.integration.conftest import WAIT_S, Stack

pytestmark = pytest.mark.integration


class CeleryWorker(WorkerProcess):
    """Celery's own command line on the package's app, not the maas-worker CLI."""

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "maas_worker.app",
            "worker",
            "-Q",
            ",".join(QUEUE_NAMES),
            "--hostname",
            self.node,
            "--concurrency",
            str(self.concurrency),
            "--loglevel",
            "INFO",
        ]


def test_celery_dash_a_maas_worker_app_serves_jobs(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    worker = CeleryWorker(
        env=stack.env, name="celery", log_path=stack.tmp / "celery.log", concurrency=1
    )
    stack.workers.append(worker)  # the fixture stops it
    worker.start().wait_ready(stack.backend)
    with stack.client() as client:
        job = client.submit("echo", {"text": "plain celery"}, priority="high")
        assert job.result(timeout=WAIT_S) == {"echo": {"text": "plain celery"}}
    assert stack.outcomes(job.id) == ["succeeded"]
