"""The batch consumer (``worker --batch-consumer``): real Redis server, real worker processes.

The pipeline's end-to-end tests (test_pipeline.py) run here again against
batch consumers, so every per-job semantic is checked on both paths; the
tests below add what is particular to batches.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from maas_worker import InvalidEnvelope, JobRejected, ResultTimeout, UnknownJob
from maas_worker.app import make_app
from maas_worker.backend import keyspace
from maas_worker.broker import fetch
from maas_worker.broker.backlog import read_backlog
from maas_worker.models.paths import BUNDLED_MODEL_DIR
from maas_worker.protocol import TASK_NAME, queue_for

from ..modelkit import holdout
from . import test_pipeline as pipeline_tests
from .conftest import Stack, message_envelope, replace_envelope, wait_for

pytestmark = pytest.mark.integration
TIMEOUT = 60.0
BATCH = ("--batch-consumer",)


@pytest.fixture
def batch_stack(make_stack: Callable[..., Stack]) -> Callable[..., Stack]:
    """`make_stack`, whose workers run batch consumers."""

    def factory(**env: str) -> Stack:
        stack = make_stack(**env)
        stack.worker_args = BATCH
        return stack

    return factory


@pytest.mark.parametrize(
    "test",
    [
        pipeline_tests.test_message_altered_in_redis_is_rejected_and_audited,
        pipeline_tests.test_every_header_field_altered_in_redis_is_rejected,
        pipeline_tests.test_byte_identical_replay_is_refused_and_the_first_result_stays,
        pipeline_tests.test_envelope_moved_to_another_task_id_is_refused,
        pipeline_tests.test_expired_job_is_not_run,
        pipeline_tests.test_unknown_key_and_worker_side_policy,
        pipeline_tests.test_job_of_a_killed_worker_is_redelivered_and_completes_once,
        pipeline_tests.test_duplicate_delivery_while_running_is_not_run_twice,
        pipeline_tests.test_no_plaintext_in_redis_or_worker_logs,
        pipeline_tests.test_queues_are_consumed_high_then_normal_then_low,
        pipeline_tests.test_a_job_that_keeps_killing_its_worker_fails_as_worker_lost,
        pipeline_tests.test_large_requests_travel_by_claim_check,
    ],
    ids=lambda t: t.__name__.removeprefix("test_"),
)
def test_pipeline_semantics_hold_in_the_batch_consumer(
    batch_stack: Callable[..., Stack], test: Callable[..., None]
) -> None:
    # A test that runs with either client (test_pipeline.py's client_kind): the sync one.
    kinds = {"client_kind": "sync"} if "client_kind" in inspect.signature(test).parameters else {}
    test(batch_stack, **kinds)


def _job_reservations(stack: Stack) -> int:
    """Job messages reserved (taken, not yet acknowledged) in kombu's unacked hash."""
    queues = {queue_for(p) for p in ("high", "normal", "low")}
    return sum(
        1
        for entry in stack.backend.hvals("unacked")
        # the queue's own list, or a tenant's list of it (fair share)
        if json.loads(entry)[2] in queues or fetch.split_tenant_queue(json.loads(entry)[2])
    )


def _batch_sizes(stack: Stack) -> list[int]:
    return [int(n) for n in re.findall(r"batch of (\d+) for digits", stack.worker_logs())]


def test_batches_give_each_job_its_own_result_opened_with_its_tenant_key(
    batch_stack: Callable[..., Stack],
) -> None:
    stack = batch_stack(MAAS_MODEL_DIR=str(BUNDLED_MODEL_DIR), MAAS_CONSUMER_BATCH="32")
    data = holdout()
    samples, expected = data["inputs"][:60], data["sklearn_predictions"][:60]
    stack.start_worker("batch", concurrency=1, args=("--loglevel", "DEBUG"))
    acme, globex = stack.client("acme"), stack.client("globex")
    # one pipeline: the consumer finds many jobs at once
    digits = acme.submit_many("digits", [{"inputs": [s]} for s in samples])
    bad = acme.submit("digits", {"inputs": [[1, 2]]})  # fails alone, inside a batch
    echoes = [globex.submit("echo", {"i": i}) for i in range(5)]
    assert [j.result(timeout=TIMEOUT)["labels"] for j in digits] == [[e] for e in expected]
    assert [j.result(timeout=TIMEOUT) for j in echoes] == [{"echo": {"i": i}} for i in range(5)]
    wait_for(lambda: bad.info().state == "failed", TIMEOUT, "the bad job's failure")
    assert bad.info().reason == "bad_input"
    # every result is sealed for its own tenant: another tenant cannot open it,
    # nor even see the job (its keys are the job's tenant's)
    for owner, other, job in (("acme", globex, digits[0]), ("globex", acme, echoes[0])):
        sealed = stack.backend.get(keyspace.result(owner, job.id))
        assert sealed is not None
        with pytest.raises(InvalidEnvelope):
            other.job(job.id)._open(sealed)
        with pytest.raises(UnknownJob):
            other.job(job.id).status()
    sizes = wait_for(
        lambda: sum(_batch_sizes(stack)) == 61 and _batch_sizes(stack),
        TIMEOUT,
        "batch log lines for 61 digits jobs",
    )
    assert max(sizes) > 1 and len(sizes) < 61  # jobs really shared model calls
    for job in [*digits, bad, *echoes]:
        assert len(stack.outcomes(job.id)) == 1


def test_private_jobs_run_in_the_batch_consumer_beside_plaintext_ones(
    batch_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """A private job (docs/private-inference.md) is run on its own, never in a shared
    model call; plaintext jobs of the same model still batch."""
    pytest.importorskip("tenseal", reason="the private extra is not installed")
    import dataclasses

    from maas_worker import Client

    stack = batch_stack(MAAS_MODEL_DIR=str(BUNDLED_MODEL_DIR), MAAS_CONSUMER_BATCH="8")
    stack.start_worker("batch", concurrency=1)
    rows = holdout()["inputs"][:3]
    client = Client(settings=dataclasses.replace(stack.settings, private_key_dir=tmp_path))
    plain = client.submit_many("digits-he", [{"inputs": [r]} for r in rows])
    private = client.submit_private("digits-he", rows, timeout=TIMEOUT)
    assert private["labels"] == [j.result(timeout=TIMEOUT)["labels"][0] for j in plain]


def test_hostile_entries_are_audited_and_the_consumer_keeps_consuming(
    batch_stack: Callable[..., Stack],
) -> None:
    stack = batch_stack()
    client = stack.client()
    # task arguments the pipeline refuses (the Celery path: test_pipeline.py)
    hostile_args: list[tuple[list[Any], dict[str, Any]]] = [
        ([], {}),
        ([1], {}),
        (["a", "b"], {}),
        (["not base64!"], {}),
        (["QUJD"], {}),
        ([{"envelope": "x"}], {}),
        (["QUJD"], {"extra": 1}),
    ]
    hostile_ids = [str(uuid.uuid4()) for _ in hostile_args]
    for task_id, (args, kwargs) in zip(hostile_ids, hostile_args, strict=True):
        client.app.send_task(
            TASK_NAME, args=args, kwargs=kwargs, task_id=task_id, queue=queue_for("high")
        )
    # queue entries that are not our messages at all
    good = client.submit("echo", {"n": 0}, priority="high")
    raw = stack.backend.lindex(stack.tenant_queue("high"), 0)
    msg = json.loads(raw)
    wrong_id = str(uuid.uuid4())
    wrong_task = {**msg, "headers": {**msg["headers"], "task": "maas.sample", "id": wrong_id}}
    # a task id that is not a canonical UUID, and a body that is not a plain task call
    bad_id = {**msg, "headers": {**msg["headers"], "id": "hostile-1"}}
    workflow_id = str(uuid.uuid4())
    workflow = {
        **msg,
        "headers": {**msg["headers"], "id": workflow_id},
        "body": base64.b64encode(
            json.dumps([["QUJD"], {}, {"callbacks": [{"task": "maas.infer"}]}]).encode()
        ).decode(),
    }
    stack.backend.lpush(
        queue_for("high"),
        b"not json at all",
        b'{"no": "properties"}',
        json.dumps(wrong_task),
        json.dumps(bad_id),
        json.dumps(workflow),
    )
    # a forged envelope (random bytes) and a tampered one
    forged = client.submit("echo", {"n": 1}, priority="normal")
    raw_forged = stack.backend.lpop(stack.tenant_queue("normal"))
    stack.backend.lpush(
        stack.tenant_queue("normal"),
        replace_envelope(raw_forged, base64.b64encode(b"\x01" + bytes(200)).decode()),
    )
    tampered = client.submit("echo", {"n": 2}, priority="normal")
    raw_t = stack.backend.lpop(stack.tenant_queue("normal"))
    data = bytearray(base64.b64decode(message_envelope(raw_t)[1]))
    data[-5] ^= 0x01  # inside the MAC
    stack.backend.lpush(
        stack.tenant_queue("normal"),
        replace_envelope(raw_t, base64.b64encode(bytes(data)).decode()),
    )
    stack.start_worker(concurrency=1)
    assert good.result(timeout=TIMEOUT) == {"echo": {"n": 0}}
    for task_id in hostile_ids:
        assert stack.wait_audit(task_id, "malformed").tenant == ""
    for task_id in (wrong_id, "hostile-1", workflow_id):
        stack.wait_audit(task_id, "malformed")
    wait_for(
        lambda: sum(1 for r in stack.audit() if r.job_id == "" and r.reason == "malformed") >= 2,
        TIMEOUT,
        "the two non-messages audited",
    )
    # Neither the forged nor the tampered message authenticates: both are
    # audited and change no job's state (anyone who can write a queue could
    # have sent them). The tampered one still names its tenant, so its
    # client is told when its wait ends; the forged one names no one.
    assert not stack.wait_audit(forged.id, "malformed").verified
    rec = stack.wait_audit(tampered.id, "tampered")
    assert rec.tenant == "acme" and not rec.verified
    for job in (forged, tampered):
        assert job.status() == "queued"
    with pytest.raises(ResultTimeout):
        forged.result(timeout=1)
    with pytest.raises(JobRejected, match="did not authenticate"):
        tampered.result(timeout=1)
    # the consumer carries on, and holds nothing unacknowledged
    assert client.submit("echo", {"n": 3}).result(timeout=TIMEOUT) == {"echo": {"n": 3}}
    wait_for(lambda: _job_reservations(stack) == 0, TIMEOUT, "every message acknowledged")


def test_sigkill_mid_batch_loses_nothing_and_delivers_nothing_twice(
    batch_stack: Callable[..., Stack],
) -> None:
    stack = batch_stack(MAAS_VISIBILITY_TIMEOUT_S="3", MAAS_LEASE_S="3")
    client = stack.client()
    sleepers = [
        client.submit("sleep", {"seconds": 0.3}, priority=p)
        for p in ("high", "normal", "low")
        for _ in range(3)
    ]
    echoes = client.submit_many("echo", [{"i": i} for i in range(30)], priority="low")
    doomed = stack.start_worker("doomed", concurrency=1)
    # a batch is under way: its first job is claimed and running
    wait_for(lambda: any(j.status() == "running" for j in sleepers), TIMEOUT, "a running job")
    doomed.kill()  # SIGKILL, consumer and Celery worker alike: no ack, no result
    assert _job_reservations(stack) > 0  # the batch's messages are reserved in Redis, not lost
    stack.start_worker("rescuer", concurrency=2)
    jobs = [*sleepers, *echoes]
    results = [j.result(timeout=TIMEOUT) for j in jobs]
    assert results[len(sleepers) :] == [{"echo": {"i": i}} for i in range(30)]
    assert all(r["slept"] >= 0.3 for r in results[: len(sleepers)])
    for job in jobs:  # exactly one result per job, never replaced
        assert stack.outcomes(job.id).count("succeeded") == 1
        assert "duplicate" not in stack.outcomes(job.id)
    wait_for(lambda: _job_reservations(stack) == 0, TIMEOUT, "every message acknowledged")
    assert read_backlog(stack.backend).total == 0


def test_consumers_stop_when_their_node_is_sigkilled(batch_stack: Callable[..., Stack]) -> None:
    """Only the node's main process killed (not its group): its consumers do not consume on
    for a node that no longer answers remote control, heartbeats or shutdown."""
    import psutil

    stack = batch_stack()
    node = stack.start_worker("orphaning", concurrency=2)
    assert node.proc is not None
    consumers = [
        c
        for c in psutil.Process(node.proc.pid).children(recursive=True)
        if "batch-consumer" in " ".join(c.cmdline())
    ]
    assert len(consumers) == 2
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait()
    _, alive = psutil.wait_procs(consumers, timeout=TIMEOUT)
    assert alive == []
    # Nothing was taken after the node died: a job submitted now waits for a node.
    job = stack.client().submit("echo", {"after": 1})
    assert job.status() == "queued"


def test_warm_shutdown_finishes_the_batch_and_the_node_answers_remote_control(
    batch_stack: Callable[..., Stack],
) -> None:
    stack = batch_stack()
    client = stack.client()
    worker = stack.start_worker("warm", concurrency=1)
    ping = subprocess.run(
        [sys.executable, "-m", "maas_worker", "ping", "--node", worker.node],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert ping.returncode == 0, ping.stderr
    assert "pong" in ping.stdout
    # The reply was consumed without acknowledgement: nothing left reserved.
    assert stack.backend.hlen("unacked") == 0
    jobs = [client.submit("sleep", {"seconds": 0.2}) for _ in range(5)]
    wait_for(lambda: any(j.status() == "running" for j in jobs), TIMEOUT, "a running job")
    assert worker.stop() == 0  # SIGTERM: the batch finishes and is acknowledged
    assert "finishing the current batch" in worker.log_path.read_text()
    assert _job_reservations(stack) == 0
    stack.start_worker("next", concurrency=1)
    for job in jobs:
        assert job.result(timeout=TIMEOUT)["slept"] >= 0.2
        assert stack.outcomes(job.id).count("succeeded") == 1


def test_flower_sees_batch_jobs_finish_through_celery_task_events(
    batch_stack: Callable[..., Stack],
) -> None:
    """Without task events Flower would show every batch job as sent, for ever."""
    stack = batch_stack()
    worker = stack.start_worker("ev", concurrency=1)
    client = stack.client()
    app = make_app(stack.settings, include_tasks=False)
    seen: list[dict[str, Any]] = []
    marker = f"event-marker-{time.time_ns()}"
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        errors: list[BaseException] = []

        def listen() -> None:
            try:
                receiver.capture(limit=None, timeout=TIMEOUT, wakeup=False)
            except BaseException as exc:
                errors.append(exc)

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        ids: list[str] = []

        def a_finished_job() -> list[dict[str, Any]]:
            # Events are not stored: submit until the receiver, subscribed by
            # now, has seen one of our jobs finish.
            job = client.submit("echo", {"text": marker})
            job.result(timeout=TIMEOUT)
            ids.append(job.id)
            return [e for e in list(seen) if e["type"] == "task-succeeded" and e["uuid"] in ids]

        done = wait_for(a_finished_job, TIMEOUT, "a task-succeeded event of a batch job")[0]
        receiver.should_stop = True
        listener.join(TIMEOUT)
    assert errors == []
    assert done["hostname"] == worker.node and done["result"] == "None"
    received = [e for e in seen if e["type"] == "task-received" and e["uuid"] == done["uuid"]]
    assert [(e["name"], e["args"], e["kwargs"]) for e in received] == [
        (TASK_NAME, "('<sealed envelope>',)", "{}")
    ]
    assert marker not in json.dumps(seen, default=str)  # an event never carries the data
