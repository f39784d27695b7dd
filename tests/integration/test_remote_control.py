"""Celery remote control against real workers: read-only unless an operator opens it.

Whoever can publish on the broker (or log in to Flower) used to be able to
shut workers down, throttle ``maas.infer`` and make a worker consume a queue
nobody checks (where Celery's own ``celery.starmap`` then ran). Each test
sends the commands as ``celery control`` would and checks the worker's
answer, its audit records, that it carries on, and that nothing ran.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from maas_worker.local.embedded import free_port

from .attacker import Attacker
from .conftest import WAIT_S, Stack, wait_for
from .services import Service, http_get

#: Commands an operator may allow, with arguments as `celery control` sends them.
OPERATOR_COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("shutdown", {}),
    ("pool_restart", {"reload": False}),
    ("pool_grow", {"n": 1}),
    ("pool_shrink", {"n": 1}),
    ("autoscale", {"max": 4, "min": 1}),
    ("rate_limit", {"task_name": "maas.infer", "rate_limit": "1/m"}),
    ("time_limit", {"task_name": "maas.infer", "soft": 0.1, "hard": 0.2}),
    ("add_consumer", {"queue": "evil"}),
    ("cancel_consumer", {"queue": "maas.high"}),
    ("disable_events", {}),
    ("memdump", {}),
    ("no_such_command", {}),
]
#: What Flower and `celery inspect` ask.
INSPECT_COMMANDS = [
    "ping",
    "stats",
    "active_queues",
    "registered",
    "conf",
    "active",
    "reserved",
    "scheduled",
    "revoked",
    "report",
]


def _ask(stack: Stack, node: str, command: str, arguments: dict[str, Any]) -> Any:
    """The one reply of ``node`` to ``command`` (as `celery control`/`inspect` send it)."""
    with stack.client("acme") as client:
        replies = client.app.control.broadcast(
            command, arguments=arguments, reply=True, timeout=5, destination=[node]
        )
    assert len(replies) == 1, f"{command}: {replies!r}"
    ((name, answer),) = replies[0].items()
    assert name == node
    return answer


def _push_starmap(stack: Stack, queue: str) -> None:
    """A well-formed Celery message for the built-in ``celery.starmap`` on ``queue``."""
    task_id = str(uuid.uuid4())
    body = [
        [],
        {
            "task": {
                "task": "maas.sample",
                "args": [],
                "kwargs": {},
                "options": {},
                "subtask_type": None,
                "immutable": False,
            },
            "it": [[]],
        },
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    message = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": "celery.starmap",
            "id": task_id,
            "root_id": task_id,
            "argsrepr": "()",
            "kwargsrepr": "{}",
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    stack.backend.lpush(queue, json.dumps(message))


def _alive(worker: Any) -> bool:
    return worker.proc is not None and worker.proc.poll() is None


def _refusals(stack: Stack) -> list[str]:
    return [
        r.detail for r in stack.audit() if r.reason == "policy" and r.detail.startswith("remote ")
    ]


def _queues(stack: Stack, node: str) -> set[str]:
    return {q["name"] for q in _ask(stack, node, "active_queues", {})}


def _celery(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "maas_worker.app", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_workers_answer_inspect_and_refuse_every_other_command(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    # Celery's consumer of the job queues (a batch consumer node's Celery worker
    # consumes only the broadcast queue; the other tests here run that default mode).
    worker = stack.start_worker(concurrency=1, args=("--celery-tasks",))
    queues = _queues(stack, worker.node)
    assert {"maas.high", "maas.normal", "maas.low"} <= queues
    for command in INSPECT_COMMANDS:
        answer = _ask(stack, worker.node, command, {})
        assert not (isinstance(answer, dict) and "error" in answer), (command, answer)
    _push_starmap(stack, "evil")

    for command, arguments in OPERATOR_COMMANDS:
        answer = _ask(stack, worker.node, command, arguments)
        assert "MAAS_REMOTE_CONTROL=operator" in answer["error"], (command, answer)
    expected = [f"remote {c} refused" for c, _ in OPERATOR_COMMANDS]

    # `celery inspect` and `celery control` as an operator types them.
    out = _celery(stack, "inspect", "active_queues", "-d", worker.node, "--json")
    assert out.returncode == 0, out.stderr
    (answer,) = json.loads(out.stdout).values()
    assert {q["name"] for q in answer} == queues
    out = _celery(stack, "control", "rate_limit", "maas.infer", "1/m", "-d", worker.node)
    # (celery's CLI prints an error reply but exits 0 whatever the replies say)
    assert "ERROR" in out.stdout and "MAAS_REMOTE_CONTROL=operator" in out.stdout
    expected.append("remote rate_limit refused")

    # Celery's start-up sync would merge "revoked" ids another node offers: not here.
    attacker = Attacker(stack)
    target = str(uuid.uuid4())
    answer = _ask(stack, worker.node, "hello", {"from_node": "evil@x", "revoked": [target]})
    assert answer["revoked"] == []
    expected.append("remote revoke refused (revoked ids in a hello)")
    _, envelope = attacker.seal(b'{"not": "revoked"}', job_id=target)
    attacker.send(envelope, job_id=target)
    assert attacker.job(target).result(timeout=WAIT_S) == {"echo": {"not": "revoked"}}
    assert sorted(
        wait_for(
            lambda: len(_refusals(stack)) >= len(expected) and _refusals(stack),
            WAIT_S,
            "an audit record per refused command",
        )
    ) == sorted(expected)

    # The worker is up, consumes what it did, at its own pace and limits.
    assert _alive(worker)
    assert _queues(stack, worker.node) == queues
    jobs = [stack.client().submit("echo", {"i": i}) for i in range(5)]
    assert [j.result(timeout=WAIT_S) for j in jobs] == [{"echo": {"i": i}} for i in range(5)]
    slow = stack.client().submit("sleep", {"seconds": 0.5})
    assert slow.result(timeout=WAIT_S)["slept"] >= 0.5  # the 0.2 s time limit was not set
    # The queue add_consumer named was never consumed: its starmap is still there.
    assert stack.backend.llen("evil") == 1
    assert "celery.starmap" not in stack.worker_logs()


def test_an_operator_can_open_the_control_but_not_other_queues_nor_revoke(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(MAAS_REMOTE_CONTROL="operator")
    worker = stack.start_worker(concurrency=1)
    answer = _ask(
        stack, worker.node, "rate_limit", {"task_name": "maas.infer", "rate_limit": "1000/s"}
    )
    assert "error" not in answer and "rate limit" in answer["ok"]
    _push_starmap(stack, "evil")
    answer = _ask(stack, worker.node, "add_consumer", {"queue": "evil"})
    assert "never consumed" in answer["error"]
    job = stack.client().submit("echo", {"kept": True})
    answer = _ask(stack, worker.node, "revoke", {"task_id": [job.id]})
    assert "maas-worker cancel" in answer["error"]
    assert job.result(timeout=WAIT_S) == {"echo": {"kept": True}}
    assert "evil" not in _queues(stack, worker.node)
    assert stack.backend.llen("evil") == 1
    assert sorted(
        wait_for(
            lambda: len(_refusals(stack)) >= 2 and _refusals(stack), WAIT_S, "two audit records"
        )
    ) == ["remote add_consumer refused", "remote revoke refused"]
    with stack.client("acme") as client:  # a worker that shuts down sends no reply
        client.app.control.broadcast("shutdown", destination=[worker.node])
    wait_for(lambda: not _alive(worker), WAIT_S, "the worker to obey the operator's shutdown")


def _post(url: str, auth: tuple[str, str]) -> tuple[int, str]:
    token = base64.b64encode(":".join(auth).encode()).decode()
    req = urllib.request.Request(
        url, data=b"", method="POST", headers={"Authorization": f"Basic {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.reason
    except urllib.error.HTTPError as exc:
        return exc.code, str(exc.reason)


AUTH = ("ops", "flower-test-password")
#: Flower's control endpoints (what its buttons post to).
FLOWER_CONTROLS = [
    "worker/shutdown/{node}",
    "worker/pool/restart/{node}",
    "worker/pool/grow/{node}?n=1",
    "worker/pool/autoscale/{node}?min=1&max=3",
    "worker/queue/add-consumer/{node}?queue=evil",
    "worker/queue/cancel-consumer/{node}?queue=maas.high",
    "task/rate-limit/maas.infer?ratelimit=1/m",
    "task/timeout/maas.infer?soft=1&hard=2",
    "task/revoke/{job}",
]


def test_flower_control_buttons_follow_the_setting(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(MAAS_FLOWER_BASIC_AUTH=":".join(AUTH))
    worker = stack.start_worker(concurrency=1)
    port = free_port()
    flower = Service(stack, "flower", "flower", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: http_get(f"{base}/api/workers", auth=AUTH)[0] == 200, WAIT_S, "Flower to answer"
        )
        for path in FLOWER_CONTROLS:
            url = f"{base}/api/{path.format(node=worker.node, job=uuid.uuid4())}"
            assert _post(url, ("ops", "wrong"))[0] == 401
            assert _post(url, AUTH) == (
                403,
                "remote control is disabled (MAAS_REMOTE_CONTROL=inspect)",
            ), path
        # The worker's page still shows, without the buttons; the worker is as it was.
        status, page = http_get(f"{base}/worker/{worker.node}", auth=AUTH)
        assert status == 200 and "#worker-shutdown," in page and "display:none" in page
        assert _alive(worker)
        assert stack.client().submit("echo", {"after": 1}).result(timeout=WAIT_S) == {
            "echo": {"after": 1}
        }
        assert not _refusals(stack)  # refused by Flower itself: nothing reached a worker
    finally:
        flower.stop()
