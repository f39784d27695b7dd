"""Flower tells the truth: a job that did not succeed is FAILURE, with its reason word.

Real Redis, a real worker in each mode (the Celery task and the batch consumer), the
task events read as Flower reads them (``celery.events.state.State`` fed by an event
receiver) and by a real Flower process, compared with ``maas-worker status`` job by job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from maas_worker.app import make_app
from maas_worker.local.embedded import free_port
from maas_worker.protocol import ARGS_REPR

from .attacker import Attacker
from .conftest import Stack, wait_for
from .services import Service, http_get

pytestmark = pytest.mark.integration
WAIT_S = 60.0
USER, PASSWORD = "ops", "flower-test-password"
SECRET = "input-bytes-that-must-not-show"
#: What Flower must show for a job in each state `maas-worker status` gives.
FLOWER_STATE = {
    "succeeded": "SUCCESS",
    "failed": "FAILURE",
    "rejected": "FAILURE",
    "cancelled": "FAILURE",
    "expired": "FAILURE",
}


class Events:
    """Every task event on the stack's broker, and Celery's own state built from them."""

    def __init__(self, stack: Stack) -> None:
        self.app = make_app(stack.settings, include_tasks=False)
        self.state = self.app.events.State()
        self.seen: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append(event)
            self.state.event(event)

    @contextmanager
    def listening(self) -> Iterator[Events]:
        with self.app.connection_for_read() as conn:
            receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})

            def listen() -> None:
                try:
                    receiver.capture(limit=None, timeout=WAIT_S * 3, wakeup=False)
                except BaseException as exc:
                    self.errors.append(exc)

            listener = threading.Thread(target=listen, daemon=True)
            listener.start()
            try:
                yield self
            finally:
                receiver.should_stop = True
                listener.join(WAIT_S)

    def send_probe(self, probe_id: str) -> None:
        """A task event of our own, to learn when a listener is subscribed."""
        with self.app.connection_for_write() as conn:
            dispatcher = self.app.events.Dispatcher(conn, hostname="probe@test")
            dispatcher.send("task-received", uuid=probe_id, name="maas.probe", args="()")
            dispatcher.close()

    def task(self, task_id: str) -> dict[str, Any] | None:
        """The task's state and exception once it is ready (SUCCESS or FAILURE)."""
        with self._lock:
            task = self.state.tasks.get(task_id)
            if task is None or task.state not in ("SUCCESS", "FAILURE"):
                return None
            return {"state": task.state, "exception": task.exception}

    def has(self, task_id: str) -> bool:
        with self._lock:
            return any(e.get("uuid") == task_id for e in self.seen)


def _status(stack: Stack, job_id: str, tenant: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "maas_worker", "status", "--json", "--tenant", tenant, job_id],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=True,
    )
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def _flower_api(base: str, path: str) -> dict[str, Any]:
    status, body = http_get(f"{base}{path}", auth=(USER, PASSWORD))
    assert status == 200, (path, status)
    data: dict[str, Any] = json.loads(body)
    return data


def _flower_has(base: str, task_id: str) -> bool:
    return http_get(f"{base}/api/task/info/{task_id}", auth=(USER, PASSWORD))[0] == 200


def _flower_failed_events(base: str) -> float:
    """Flower's own count of task-failed events for maas.infer (its Failed counter)."""
    status, body = http_get(f"{base}/metrics", auth=(USER, PASSWORD))
    assert status == 200
    pattern = re.compile(r"^flower_events_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE)
    return sum(
        float(value)
        for labels, value in pattern.findall(body)
        if 'type="task-failed"' in labels and 'task="maas.infer"' in labels
    )


def test_flower_shows_each_jobs_real_outcome_with_its_reason_word(
    iso_stack: Callable[..., Stack],
) -> None:
    stack = iso_stack(MAAS_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    flower = Service(stack, "flower", "flower", "--port", str(port))
    events = Events(stack)
    try:
        with events.listening():
            # Events are not stored: both listeners must be subscribed before any job runs.
            wait_for(lambda: http_get(f"{base}/healthcheck")[0] == 200, WAIT_S, "Flower to answer")
            probe = f"probe-{uuid.uuid4()}"

            def subscribed() -> bool:
                events.send_probe(probe)
                time.sleep(0.2)
                return events.has(probe) and _flower_has(base, probe)

            wait_for(subscribed, WAIT_S, "the event receiver and Flower to subscribe")

            # Every job is queued before the worker starts.
            client = stack.client()
            jobs: dict[str, tuple[str, str]] = {}  # name -> (job id, tenant)
            jobs["succeeded"] = (client.submit("echo", {"text": SECRET}).id, "acme")
            # sleep takes {"seconds": a number}: the model fails the job bad_input
            jobs["failed"] = (client.submit("sleep", {"seconds": SECRET}).id, "acme")
            cancelled = client.submit("echo", {"text": SECRET})
            assert cancelled.cancel()
            jobs["cancelled"] = (cancelled.id, "acme")
            # A client that skips its own policy check: globex may run only echo.
            attacker = Attacker(stack)
            header, envelope = attacker.seal(
                json.dumps({"seconds": SECRET}).encode(), model="sleep"
            )
            attacker.send(envelope, job_id=header.job_id)
            jobs["rejected"] = (header.job_id, "globex")
            issued = int(time.time() * 1000) - 600_000
            header, envelope = attacker.seal(
                json.dumps({"text": SECRET}).encode(),
                issued_at_ms=issued,
                expires_at_ms=issued + 60_000,
            )
            attacker.send(envelope, job_id=header.job_id)
            jobs["expired"] = (header.job_id, "globex")

            stack.start_worker("fl", concurrency=1)
            seen = {
                name: wait_for(lambda i=job_id: events.task(i), WAIT_S, f"the {name} job's end")
                for name, (job_id, _) in jobs.items()
            }
            statuses = {name: _status(stack, job_id, t) for name, (job_id, t) in jobs.items()}
            wait_for(
                lambda: len(_flower_api(base, "/api/tasks?state=FAILURE")) >= 4,
                WAIT_S,
                "Flower to have seen every failed job",
            )
            flower_failed = set(_flower_api(base, "/api/tasks?state=FAILURE"))
            flower_tasks = {
                name: _flower_api(base, f"/api/task/info/{job_id}")
                for name, (job_id, _) in jobs.items()
            }
            failed_counter = _flower_failed_events(base)
    finally:
        flower.stop()
    assert events.errors == []

    # maas-worker status says what each job became ...
    assert {name: s["state"] for name, s in statuses.items()} == {n: n for n in jobs}
    assert statuses["failed"]["reason"] == "bad_input"
    # ... and the task events say the same: SUCCESS only for the job that succeeded
    assert {name: t["state"] for name, t in seen.items()} == {
        name: FLOWER_STATE[s["state"]] for name, s in statuses.items()
    }
    assert Counter(t["state"] for t in seen.values()) == Counter(
        FLOWER_STATE[s["state"]] for s in statuses.values()
    )
    # the exception is the outcome and its reason word, nothing else
    assert {name: t["exception"] for name, t in seen.items()} == {
        "succeeded": None,
        "failed": "JobNotSucceeded('failed: bad_input')",
        "cancelled": "JobNotSucceeded('cancelled')",
        "rejected": "JobNotSucceeded('rejected: policy')",
        "expired": "JobNotSucceeded('expired')",
    }
    # no input bytes in any event (arguments, exception, traceback)
    assert SECRET not in json.dumps(events.seen, default=str)

    # Flower itself: its FAILURE list, each task's page and its Failed counter
    failed_ids = {job_id for name, (job_id, _) in jobs.items() if name != "succeeded"}
    assert flower_failed == failed_ids
    assert {name: t["state"] for name, t in flower_tasks.items()} == {
        name: t["state"] for name, t in seen.items()
    }
    assert flower_tasks["rejected"]["exception"] == "JobNotSucceeded('rejected: policy')"
    assert SECRET not in json.dumps(flower_tasks)
    assert failed_counter == len(failed_ids)


def test_a_batch_submitted_shows_as_sent_before_any_worker_runs_it(
    make_stack: Callable[..., Stack],
) -> None:
    # The sync client publishes Celery's task-sent event of each job (one buffered
    # message per batch, wire.py): Flower lists a queued job from the moment it is
    # queued, named and with its arguments hidden, as when Celery framed each message.
    stack = make_stack()
    events = Events(stack)
    with events.listening():
        probe = f"probe-{uuid.uuid4()}"

        def subscribed() -> bool:
            events.send_probe(probe)
            time.sleep(0.2)
            return events.has(probe)

        wait_for(subscribed, WAIT_S, "the event receiver to subscribe")
        with stack.client() as client:
            jobs = client.submit_many("echo", [{"text": SECRET}] * 3, priority="high")
        wait_for(lambda: all(events.has(j.id) for j in jobs), WAIT_S, "the task-sent events")
    assert events.errors == []
    for job in jobs:
        (sent,) = [e for e in events.seen if e.get("uuid") == job.id]
        assert sent["type"] == "task-sent"
        assert (sent["name"], sent["args"], sent["kwargs"]) == ("maas.infer", ARGS_REPR, "{}")
        assert (sent["queue"], sent["routing_key"]) == ("maas.high", "maas.high")
        assert events.state.tasks[job.id].state == "PENDING"  # Celery's state for "sent"
        assert SECRET not in json.dumps(sent)
