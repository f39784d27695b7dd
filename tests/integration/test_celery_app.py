"""``celery -A maas_worker.app worker`` runs jobs as ``maas-worker worker`` does."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.local.processes import WorkerProcess
from maas_worker.protocol import QUEUE_NAMES
from maas_worker.tenancy.keyring import save_keyring
from tests.integration.conftest import WAIT_S, Stack, make_keyring

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


@pytest.mark.parametrize("refusal", ["WRONGPASS", "NOAUTH", "NOPERM"])
def test_celery_worker_exits_at_once_with_the_cause_when_redis_refuses_its_credentials(
    refusal: str, tmp_path: Path
) -> None:
    """Under Celery's own CLI too: one line naming Redis's refusal, exit 1, no retries."""
    keyring = tmp_path / "keyring.json"
    save_keyring(keyring, make_keyring())
    # A server of this test's own: its users are changed below.
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url)
        host = server.url.removeprefix("redis://")
        secret = "s3cret-" + refusal.lower()
        if refusal == "WRONGPASS":
            url = f"redis://nobody:{secret}@{host}"
        elif refusal == "NOAUTH":
            admin.config_set("requirepass", secret)
            url = server.url  # no password given
        else:  # a user who may log in but run nothing (not even PING)
            admin.acl_setuser("idle", enabled=True, passwords=[f"+{secret}"], keys=["*"])
            url = f"redis://idle:{secret}@{host}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update({"MAAS_BROKER_URL": url, "MAAS_KEYRING": str(keyring)})
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "maas_worker.app", "worker", "-Q", "maas.high"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        admin.close()
    assert out.returncode == 1, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "maas-worker: error:" in ln]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(
        f"maas-worker: error: Redis refused the worker's credentials ({refusal} "
    )
    assert "Trying again" not in out.stderr + out.stdout
    assert secret not in out.stderr + out.stdout
