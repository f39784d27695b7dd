"""Flower as its user sees it: jobs in every state, each worker's resource sample.

Real Redis, a real worker, beat and Flower. Headless Chromium (Debian's
``chromium``; .ci/run installs it) logs in with basic auth and reads what a
user reads: the task list, with a job in every state docs/monitoring.md's
table lists, and the worker's page with its latest resource sample. What
Flower says of each job is compared with ``maas-worker status`` and, for the
rejected one, ``maas-worker audit``. Samples are not tasks there: they appear
in neither the task list nor the counters. Both worker modes show the sample
on the worker's page (checked without a browser: that page is rendered by
the server).

The two screenshots go to the test's tmp_path. To refresh the ones in the
docs, name a folder: ``MAAS_FLOWER_SCREENSHOTS=docs .venv/bin/pytest
tests/integration/test_flower.py`` writes docs/flower-tasks.png and
docs/flower-worker.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from maas_worker.local.embedded import free_port
from maas_worker.local.processes import WorkerProcess
from maas_worker.monitoring.samples import SampleStore, gpu_sample

from .attacker import Attacker
from .browser import chromium, chromium_path
from .conftest import Stack, wait_for
from .services import Service, http_get

pytestmark = pytest.mark.integration
USER, PASSWORD = "ops", "flower-test-password"
WAIT_S = 60.0
SECRET = "plaintext-that-must-not-show"
#: Folder to copy the screenshots into, with the names docs/monitoring.md uses.
SCREENSHOTS_ENV = "MAAS_FLOWER_SCREENSHOTS"
SHOTS = ("flower-tasks.png", "flower-worker.png")
#: Wide enough for every column of the task list (FLOWER_TASK_COLUMNS) without scrolling.
TASKS_VIEWPORT = (1800, 600)
#: The worker page's screenshot is as tall as the page (the sample's rows are many).
WORKER_VIEWPORT = (1400, 800)
#: The readable rows of a sample on the worker page (its Other tab).
SAMPLE_ROWS = (
    "sample taken",
    "sample cpu",
    "sample memory",
    "sample swap",
    "sample load",
    "sample pool",
    "sample gpu",
    "sample jobs",
)


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


def test_flowers_broker_page_counts_the_jobs_in_every_tenants_list(
    make_stack: Callable[..., Stack],
) -> None:
    """Fair share queues jobs in one list per tenant; Flower counts them all."""
    stack = make_stack(MAAS_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    with stack.client("acme") as acme, stack.client("globex") as globex:
        acme.submit_many("echo", [{"i": i} for i in range(5)], priority="normal")
        acme.submit("echo", {"i": 0}, priority="high")
        globex.submit_many("echo", [{"i": i} for i in range(3)], priority="normal")
    port = free_port()
    flower = Service(stack, "flower", "flower", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(f"{base}/healthcheck")[0] == 200, WAIT_S, "Flower to answer")
        status, body = http_get(f"{base}/api/queues/length", auth=(USER, PASSWORD))
        page = http_get(f"{base}/broker", auth=(USER, PASSWORD))[1]
    finally:
        flower.stop()
    assert status == 200
    counts = {q["name"]: q["messages"] for q in json.loads(body)["active_queues"]}
    assert (counts["maas.high"], counts["maas.normal"], counts["maas.low"]) == (1, 8, 0)
    assert "maas.normal" in page
    assert "Traceback" not in flower.log()
    assert flower.proc.returncode == 0, "SIGTERM did not end Flower (it was killed)"


def test_flower_in_a_browser_shows_every_job_state_and_the_workers_sample(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    browser = chromium_path()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    stack = make_stack(**MONITORED)
    with flower_and_beat(stack) as base:
        # authentication is on: no or wrong credentials are refused
        assert http_get(f"{base}/tasks")[0] == 401
        assert http_get(f"{base}/api/tasks", auth=(USER, "wrong"))[0] == 401
        assert http_get(f"{base}/metrics")[0] == 401  # Flower's own leaves it open
        assert http_get(f"{base}/metrics", auth=(USER, PASSWORD))[0] == 200
        worker = stack.start_worker("fl1", concurrency=1)
        listening_since = _flower_follows(base, worker)
        jobs = _jobs_in_every_state(stack)
        flower_tasks = {
            name: wait_for(lambda i=job_id: _finished(base, i), WAIT_S, f"Flower: the {name} job")
            for name, (job_id, _) in jobs.items()
        }
        statuses = {name: _status(stack, job_id, t) for name, (job_id, t) in jobs.items()}
        audit = stack.cli("audit", "--json")
        _sampled_since(stack, worker, listening_since)
        flower_list = _api(base, "/api/tasks")
        counters = _counters(base, worker.node)
        stats = _stats(base, worker.node)
        shots = (tmp_path / SHOTS[0], tmp_path / SHOTS[1])
        tasks_text, worker_text = asyncio.run(
            _browse(browser, base, worker.node, [job_id for job_id, _ in jobs.values()], shots)
        )

    # maas-worker status says what each job became; Flower agrees, job by job
    assert {name: s["state"] for name, s in statuses.items()} == {name: name for name in jobs}
    assert audit.returncode == 0, audit.stderr
    rejected_id = jobs["rejected"][0]
    (record,) = [
        r for r in map(json.loads, audit.stdout.splitlines()) if r["job_id"] == rejected_id
    ]
    assert record["reason"] == statuses["rejected"]["reason"] == "policy"
    assert {name: (t["state"], t["exception"]) for name, t in flower_tasks.items()} == {
        name: _flower_says(s) for name, s in statuses.items()
    }
    assert _flower_says(statuses["failed"]) == ("FAILURE", "JobNotSucceeded('failed: bad_input')")
    assert (
        flower_tasks["rejected"]["exception"] == f"JobNotSucceeded('rejected: {record['reason']}')"
    )

    # the task list holds the jobs and nothing else: no sample, however many were taken
    assert set(flower_list) == {job_id for job_id, _ in jobs.values()}
    assert {t["name"] for t in flower_list.values()} == {"maas.infer"}
    # ... and the worker's counters count jobs only (Processed = task-received)
    failed = sum(1 for s in statuses.values() if s["state"] != "succeeded")
    assert counters == {
        "task-received": len(jobs),
        "task-succeeded": len(jobs) - failed,
        "task-failed": failed,
    }
    # Celery's own per-task-name count in the stats reply counts the node's Celery
    # tasks by name: the jobs too in the Celery-task mode, none in the batch
    # consumer mode (the default: its jobs are counted by the events above)
    celery_jobs = len(jobs) if stats["worker mode"] == "Celery tasks" else 0
    assert stats["total"].get("maas.infer", 0) == celery_jobs
    assert stats["total"].get("maas.sample", 0) >= 1

    # /api/workers: the whole sample, this node's, taken while Flower listened
    sample = stats["sample"]
    assert sample["node"] == worker.node and sample["at"] > listening_since
    assert sample["cpu"]["cores"] == len(sample["cpu"]["per_core"]) >= 1
    assert {"used_percent", "available_bytes"} <= set(sample["memory"])
    assert "used_percent" in sample["swap"] and len(sample["load"]) == 3
    assert sample["pool"]["processes"] == 1 and len(sample["pool"]["rss_bytes"]) == 1
    assert {"finished", "per_s", "busy_fraction"} <= set(sample["jobs"])

    # what the user reads: each job's id, state and reason words, never its input
    for name, (job_id, _) in jobs.items():
        assert job_id in tasks_text, name
    for words in ("failed: bad_input", "rejected: policy", "'cancelled'", "'expired'"):
        assert words in tasks_text
    assert tasks_text.count("SUCCESS") == 1 and tasks_text.count("FAILURE") == failed
    assert "<sealed envelope>" in tasks_text and "maas.sample" not in tasks_text
    # the worker page's sample, readable: CPU per core, memory, swap, load, pool, jobs/s, GPU
    for row in SAMPLE_ROWS:
        assert row in worker_text
    assert re.search(r"sample cpu\s+[0-9.]+% \(per core: [0-9 ]+\)", worker_text)
    assert re.search(r"sample memory\s+[0-9.]+% used, \d+ MiB available of \d+ MiB", worker_text)
    assert re.search(r"sample pool\s+1 process, RSS \d+ MiB, open fds \d+; main", worker_text)
    assert re.search(r"sample jobs\s+\d+ finished, [0-9.]+/s", worker_text)
    if gpu_sample() is None:  # no NVML on this host: the row says so
        assert re.search(r"sample gpu\s+none", worker_text)
    for text in (tasks_text, worker_text):
        assert SECRET not in text
    assert all(shot.stat().st_size > 10_000 for shot in shots)
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        for shot in shots:
            shutil.copyfile(shot, Path(folder) / shot.name)


def test_the_worker_page_shows_the_sample_in_both_worker_modes(
    iso_stack: Callable[..., Stack],
) -> None:
    stack = iso_stack(**MONITORED)
    with flower_and_beat(stack) as base:
        worker = stack.start_worker("fl2", concurrency=1)
        listening_since = _flower_follows(base, worker)
        job = stack.client().submit("echo", {"text": SECRET})
        job.result(timeout=WAIT_S)
        wait_for(lambda: _finished(base, job.id), WAIT_S, "Flower to see the job finish")
        # the job counted in a later sample (the worker counts it once the task ends)
        stats = wait_for(
            lambda: (
                (st := _stats(base, worker.node)).get("sample jobs", "").startswith("1 finished")
                and st
            ),
            WAIT_S,
            "a sample that counts the job",
        )
        page = _page_text(base, f"/worker/{worker.node}")
        tasks = _api(base, "/api/tasks")
        counters = _counters(base, worker.node)
    # the pool is the prefork child, or the batch consumer process: one either way
    assert stats["sample"]["node"] == worker.node
    assert stats["sample"]["pool"]["processes"] == 1
    assert stats["sample"]["at"] > listening_since
    for row in SAMPLE_ROWS:
        assert f"{row} {stats[row]}" in page
    assert "per core" in page and SECRET not in page
    assert list(tasks) == [job.id]
    assert counters == {"task-received": 1, "task-succeeded": 1, "task-failed": 0}


# -- helpers -------------------------------------------------------------------------------------
#: A stack whose workers sample every second, behind Flower's basic auth.
MONITORED = {
    "MAAS_SAMPLE_INTERVAL_S": "1",
    "MAAS_METRICS_PORT": "0",
    "MAAS_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
}


@contextlib.contextmanager
def flower_and_beat(stack: Stack) -> Iterator[str]:
    """Flower (on a free port, answering) and beat for ``stack``; yields Flower's URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    flower = Service(stack, "flower", "flower", "--port", str(port))
    beat = Service(stack, "beat", "beat", "--loglevel", "WARNING")
    try:
        wait_for(lambda: http_get(f"{base}/healthcheck")[0] == 200, WAIT_S, "Flower to answer")
        yield base
    finally:
        beat.stop()
        flower.stop()


def _api(base: str, path: str) -> dict[str, Any]:
    status, body = http_get(f"{base}{path}", auth=(USER, PASSWORD))
    assert status == 200, (path, status, body[:200])
    data: dict[str, Any] = json.loads(body)
    return data


def _flower_follows(base: str, worker: WorkerProcess) -> float:
    """Wait until Flower lists ``worker`` as online (its heartbeats: Flower gets events)."""
    wait_for(
        lambda: _api(base, "/api/workers?status=1").get(worker.node) is True,
        WAIT_S,
        "Flower to list the worker as online",
    )
    return time.time()


def _sampled_since(stack: Stack, worker: WorkerProcess, since: float) -> None:
    """Wait until the node has stored a sample taken after ``since`` (a sample task ran).

    And one with rates: the first sample after a start has none to compare with.
    """
    store = SampleStore(stack.backend, interval_s=stack.settings.sample_interval_s)
    wait_for(
        lambda: (
            (s := store.get(worker.node)) is not None
            and s["at"] > since
            and s["jobs"]["per_s"] is not None
        ),
        WAIT_S,
        "a sample taken while Flower listened",
    )


def _finished(base: str, task_id: str) -> dict[str, Any] | None:
    status, body = http_get(f"{base}/api/task/info/{task_id}", auth=(USER, PASSWORD))
    task: dict[str, Any] = json.loads(body) if status == 200 else {}
    return task if task.get("state") in ("SUCCESS", "FAILURE") else None


def _stats(base: str, node: str) -> dict[str, Any]:
    """The worker's ``stats`` reply, fresh (as its page shows it), from ``/api/workers``."""
    workers = _api(base, f"/api/workers?refresh=1&workername={node}")
    stats: dict[str, Any] = workers[node]["stats"]
    return stats


def _counters(base: str, node: str) -> dict[str, int]:
    """The worker's Processed, Succeeded and Failed counts on Flower's dashboard."""
    (row,) = [w for w in _api(base, "/workers?json=1")["data"] if w["hostname"] == node]
    return {k: int(row.get(k, 0)) for k in ("task-received", "task-succeeded", "task-failed")}


def _page_text(base: str, path: str) -> str:
    """A server-rendered page's text, tags dropped and white space folded."""
    status, body = http_get(f"{base}{path}", auth=(USER, PASSWORD))
    assert status == 200, (path, status)
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", body, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def _status(stack: Stack, job_id: str, tenant: str) -> dict[str, Any]:
    """``maas-worker status --json`` (Job.info) of one job."""
    out = stack.cli("status", "--json", "--tenant", tenant, job_id)
    assert out.returncode == 0, out.stderr
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def _flower_says(status: dict[str, Any]) -> tuple[str, str | None]:
    """What docs/monitoring.md's table says Flower shows for a job ``status`` describes."""
    state, reason = status["state"], status["reason"]
    if state == "succeeded":
        return "SUCCESS", None
    words = f"{state}: {reason}" if state in ("failed", "rejected") else state
    return "FAILURE", f"JobNotSucceeded({words!r})"


def _jobs_in_every_state(stack: Stack) -> dict[str, tuple[str, str]]:
    """One job for each state of the docs' table: name -> (job id, tenant)."""
    client = stack.client()
    jobs: dict[str, tuple[str, str]] = {}
    # The worker has one process: the jobs after this one wait in the queue for it.
    jobs["succeeded"] = (client.submit("sleep", {"seconds": 1.5}).id, "acme")
    # sleep takes {"seconds": a number}: the model fails the job bad_input
    jobs["failed"] = (client.submit("sleep", {"seconds": SECRET}).id, "acme")
    cancelled = client.submit("echo", {"text": SECRET})
    assert cancelled.cancel()  # still queued behind the first job
    jobs["cancelled"] = (cancelled.id, "acme")
    # A client that skips its own policy check: globex may run only echo.
    attacker = Attacker(stack)
    header, envelope = attacker.seal(json.dumps({"seconds": SECRET}).encode(), model="sleep")
    attacker.send(envelope, job_id=header.job_id)
    jobs["rejected"] = (header.job_id, "globex")
    issued = int(time.time() * 1000) - 600_000
    header, envelope = attacker.seal(
        json.dumps({"text": SECRET}).encode(), issued_at_ms=issued, expires_at_ms=issued + 60_000
    )
    attacker.send(envelope, job_id=header.job_id)
    jobs["expired"] = (header.job_id, "globex")
    return jobs


async def _browse(
    browser: str, base: str, node: str, job_ids: list[str], shots: tuple[Path, Path]
) -> tuple[str, str]:
    """The task list's text and the worker page's (its Other tab), with a screenshot of each."""
    async with chromium(browser) as page:
        await page.login_with_basic_auth(USER, PASSWORD)
        await page.viewport(*TASKS_VIEWPORT)  # before any page lays out
        await page.goto(f"{base}/tasks")
        # the table is filled by Flower's JavaScript from its API
        tasks = await page.wait_for_text(*job_ids, "rejected: policy", timeout_s=WAIT_S, reload_s=5)
        await page.screenshot(shots[0])
        await page.viewport(*WORKER_VIEWPORT)
        await page.goto(f"{base}/worker/{node}")
        await page.wait_for_text(node, "Other", timeout_s=WAIT_S)
        await page.click("#worker-tab-other")
        worker = await page.wait_for_text(*SAMPLE_ROWS, timeout_s=WAIT_S)
        # the tab fades in: shoot once it is opaque
        await page.wait_until(
            "getComputedStyle(document.getElementById('tab-other')).opacity === '1'"
        )
        await page.screenshot(shots[1], full_page=True)
        return tasks, worker
