"""Flower in a real browser: login, the task list, samples readable, jobs sealed.

Headless Chromium (Debian's ``chromium``; .ci/run installs it) logs in to a
Flower started by the test with basic auth and reads the tasks page. Set
``MAAS_FLOWER_SCREENSHOT=docs/flower-tasks.png`` to refresh the screenshots in
the docs (the task list, and the sample's own page as flower-sample.png).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from maas_worker.local.embedded import free_port

from .browser import chromium, chromium_path
from .conftest import Stack, wait_for
from .services import Service, http_get

pytestmark = pytest.mark.integration
USER, PASSWORD = "ops", "flower-test-password"
WAIT_S = 60.0
SECRET = "plaintext-that-must-not-show"


def test_flower_refuses_to_start_without_authentication(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    out = subprocess.run(
        [sys.executable, "-m", "maas_worker", "flower", "--port", "1"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "maas-worker: error: refusing to start Flower without authentication: set "
        "MAAS_FLOWER_BASIC_AUTH=user:password (or pass --unauthenticated)"
    ]


def test_flower_takes_its_own_options_after_ours(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(MAAS_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    port = free_port()
    flower = Service(
        stack, "flower", "flower", "--port", str(port), "--max_tasks=50", "--url_prefix", "ops"
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(f"{base}/ops/healthcheck")[0] == 200, WAIT_S, "Flower to answer")
        assert http_get(f"{base}/healthcheck")[0] == 404  # everything moved under the prefix
        assert http_get(f"{base}/ops/api/workers")[0] == 401  # and still behind the credentials
        assert http_get(f"{base}/ops/api/workers", auth=(USER, PASSWORD))[0] == 200
        assert http_get(f"{base}/ops/metrics")[0] == 401
    finally:
        flower.stop()


def test_flower_in_a_browser_shows_samples_and_only_sealed_jobs(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    browser = chromium_path()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    stack = make_stack(
        MAAS_SAMPLE_INTERVAL_S="1",
        MAAS_METRICS_PORT="0",
        MAAS_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}",
    )
    port = free_port()
    flower = Service(stack, "flower", "flower", "--port", str(port))
    stack.start_worker("fl1", concurrency=1)
    beat = Service(stack, "beat", "beat", "--loglevel", "WARNING")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: http_get(f"{base}/api/workers", auth=(USER, PASSWORD))[0] == 200,
            WAIT_S,
            "Flower to answer",
        )
        # authentication is on: no or wrong credentials are refused
        assert http_get(f"{base}/tasks")[0] == 401
        assert http_get(f"{base}/api/tasks", auth=(USER, "wrong"))[0] == 401
        assert http_get(f"{base}/metrics")[0] == 401  # Flower's own leaves it open
        assert http_get(f"{base}/metrics", auth=(USER, PASSWORD))[0] == 200
        assert http_get(f"{base}/healthcheck")[0] == 200  # for container health checks
        job = stack.client().submit("echo", {"text": SECRET}, priority="high")
        job.result(timeout=WAIT_S)
        seen = wait_for(lambda: _task(base, job.id), WAIT_S, "Flower to have seen the job")
        # the producer's task-sent event: a job shows in Flower from the moment it is queued
        assert seen["sent"] is not None
        assert (seen["args"], seen["result"]) == ("('<sealed envelope>',)", "None")
        sample_id = wait_for(
            lambda: _a_sample_id(base), WAIT_S, "Flower to have seen a resource sample"
        )
        shots = (tmp_path / "flower-tasks.png", tmp_path / "flower-sample.png")
        tasks, detail = asyncio.run(_browse(browser, base, job.id, sample_id, shots))
    finally:
        beat.stop()
        flower.stop()
    assert "maas.sample" in tasks and "per core" in tasks and "memory" in tasks
    assert "maas.infer" in tasks and "<sealed envelope>" in tasks
    for text in (tasks, detail):
        assert SECRET not in text
    assert "per core" in detail and "open fds" in detail and "load" in detail
    assert all(shot.stat().st_size > 10_000 for shot in shots)
    target = os.environ.get("MAAS_FLOWER_SCREENSHOT")
    if target:
        shutil.copyfile(shots[0], target)
        shutil.copyfile(shots[1], Path(target).with_name("flower-sample.png"))


def _task(base: str, task_id: str) -> dict[str, Any] | None:
    status, body = http_get(f"{base}/api/task/info/{task_id}", auth=(USER, PASSWORD))
    task: dict[str, Any] = json.loads(body) if status == 200 else {}
    return task if task.get("state") == "SUCCESS" else None


def _a_sample_id(base: str) -> str | None:
    status, body = http_get(
        f"{base}/api/tasks?taskname=maas.sample&state=SUCCESS", auth=(USER, PASSWORD)
    )
    tasks = json.loads(body) if status == 200 else {}
    return next((uid for uid, t in tasks.items() if "per core" in (t.get("result") or "")), None)


async def _browse(
    browser: str, base: str, job_id: str, sample_id: str, shots: tuple[Path, Path]
) -> tuple[str, str]:
    async with chromium(browser) as page:
        await page.login_with_basic_auth(USER, PASSWORD)
        await page.screenshot(shots[0])  # sets the viewport before the page lays out
        await page.goto(f"{base}/tasks")
        # the table is filled by Flower's JavaScript from its API
        tasks = await page.wait_for_text(
            "maas.sample", "per core", job_id[:8], "<sealed envelope>", timeout_s=WAIT_S, reload_s=5
        )
        await page.screenshot(shots[0])
        # the list truncates long results: the task's own page shows all of the sample
        await page.goto(f"{base}/task/{sample_id}")
        detail = await page.wait_for_text(sample_id, "per core", timeout_s=WAIT_S)
        await page.screenshot(shots[1])
        return tasks, detail
