"""Scenario 5: hostile entries written straight into the job queues, without the client.

Someone with Redis write access pushes what a real client never sends: other
content types (pickle, YAML, raw data), entries that are not messages at all,
the wrong number of arguments, another task's name, a task id that is not a
UUID, a body that is not a plain task call (a workflow, nesting too deep), a
huge body, a sealed job moved to a queue of another priority with a matching
forged routing key. Each must be refused without being deserialised, audited
where it reaches our code, and the worker must keep consuming, in the same
process.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest

from maas_worker.protocol import TASK_NAME

from .conftest import SIZE, Stack, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]
WAIT_S = 120.0
QUEUE = "maas.high"


class _Trap:
    """Unpickling (or an unsafe YAML load) of the payload creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def message(
    *,
    body: bytes,
    content_type: str = "application/json",
    task: str = TASK_NAME,
    task_id: str | None = None,
    queue: str = QUEUE,
    headers: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """A kombu Redis message as a producer would write it: (JSON text, task id)."""
    task_id = task_id or str(uuid.uuid4())
    hdrs = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "retries": 0,
        "argsrepr": "('<sealed envelope>',)",
        "kwargsrepr": "{}",
    }
    if headers is not None:
        hdrs = headers
    props = {
        "correlation_id": task_id,
        "delivery_mode": 2,
        "priority": 0,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": hdrs,
            "properties": props,
        }
    ), task_id


def celery_body(args: list[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    return json.dumps(
        [args, kwargs or {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    ).encode()


def test_hostile_queue_entries_are_refused_audited_and_the_worker_carries_on(
    make_stack: Any, report: Any, tmp_path: Path
) -> None:
    stack: Stack
    stack, _ = make_stack()
    worker = stack.start_worker("target", concurrency=1)
    assert worker.proc is not None
    pid = worker.proc.pid
    client = stack.client()
    trap = tmp_path / "deserialised"
    header, envelope = client.seal("echo", {"text": "x"}, priority="low")
    low_job = client.seal("echo", {"text": "moved"}, priority="low")

    entries: dict[str, tuple[str, str | None]] = {}  # name -> (entry, task id if audited by id)

    def add(name: str, entry: tuple[str, str] | str, by_id: bool = True) -> None:
        if isinstance(entry, tuple):
            entries[name] = (entry[0], entry[1] if by_id else None)
        else:
            entries[name] = (entry, None)

    add(
        "pickle",
        message(
            body=pickle.dumps(((_Trap(trap),), {}, {})),
            content_type="application/x-python-serialize",
        ),
    )
    add(
        "yaml",
        message(
            body=f"- !!python/object/apply:pathlib.Path.touch [{trap}]\n- {{}}\n- {{}}\n".encode(),
            content_type="application/x-yaml",
        ),
    )
    add("application/data", message(body=b"\x00\x01\x02", content_type="application/data"))
    add("missing argument", message(body=celery_body([])))
    add("extra argument", message(body=celery_body([envelope, "extra"])))
    add("extra kwargs", message(body=celery_body([envelope], {"model": "sleep"})))
    add("wrong type", message(body=celery_body([{"envelope": envelope}])))
    for task in ("maas.sample", "celery.accumulate", "celery.chord_unlock", "no.such.task"):
        add(f"task {task}", message(body=celery_body([envelope]), task=task))
    add(
        "protocol 1",
        message(
            body=json.dumps(
                {"task": TASK_NAME, "id": str(uuid.uuid4()), "args": [envelope], "kwargs": {}}
            ).encode(),
            headers={},
        ),
        by_id=False,
    )
    add("huge body", message(body=celery_body(["A" * (SIZE.huge_body_mb << 20)])))
    add(
        "task id not a UUID",
        message(body=celery_body([envelope]), task_id=f"hostile-{uuid.uuid4()}"),
    )
    add(
        "task id of another form",
        message(body=celery_body([envelope]), task_id=str(uuid.uuid4()).upper()),
    )
    add(
        "workflow",
        message(
            body=json.dumps(
                [[envelope], {}, {"callbacks": [{"task": "celery.accumulate", "args": []}]}]
            ).encode()
        ),
    )
    add("not a task call", message(body=json.dumps({"args": [envelope]}).encode()))
    add(
        "nested too deep",
        message(  # [args, kwargs, embed], kwargs 100,000 levels deep
            body=b'[["'
            + envelope.encode()
            + b'"], {"x": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}, {}]"
        ),
    )
    add("not JSON", "this is not a kombu message")
    add("JSON, not a message", "[1, 2, 3]")
    add("no delivery tag", json.dumps({"body": "", "headers": {}, "properties": {}}))
    add("bad base64 body", message(body=b"")[0].replace('"body": ""', '"body": "%%%"'), False)
    add("empty body", message(body=b""))  # not a task call: refused before Celery reads it
    # A sealed low job moved to the high queue, its routing key forged to say "low".
    add(
        "moved priority",
        message(body=celery_body([low_job[1]]), task_id=low_job[0].job_id, queue="maas.low"),
    )

    for entry, _ in entries.values():
        stack.backend.lpush(QUEUE, entry)
    # The worker carries on: a real job behind all of them completes.
    job = client.submit("echo", {"text": "after"}, priority="high")
    assert job.result(timeout=WAIT_S) == {"echo": {"text": "after"}}
    wait_for(
        lambda: stack.backend.llen(QUEUE) == 0 and stack.backend.hlen("unacked") == 0,
        WAIT_S,
        "every hostile entry to be consumed, none left reserved",
    )
    assert worker.proc.poll() is None and worker.proc.pid == pid  # same process, alive

    audited = {r.job_id: r.reason for r in stack.audit()}
    for name, (_, task_id) in entries.items():
        if task_id is not None:
            assert audited.get(task_id) in ("malformed", "oversize", "tampered"), name
    assert audited[entries["huge body"][1] or ""] == "oversize"
    assert audited[low_job[0].job_id] == "tampered"
    assert not trap.exists()  # nothing was unpickled or YAML-loaded
    logs = stack.worker_logs()
    assert "Unrecoverable error" not in logs
    assert header.job_id not in logs  # the envelope's own job never ran either
    report(
        hostile_entries=len(entries), audited=len(stack.audit()), worker_restarts=0, deserialised=0
    )
