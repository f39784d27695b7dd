"""The check every queue entry passes (`check_message`) and the headers a job runs with.

Messages here are built by Celery itself (``send_task`` through kombu's
in-memory transport, which prepares and encodes a message exactly as the
Redis transport does before it stores it as JSON), then tampered with the
way someone with write access to a queue could.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from kombu.transport import memory

from maas_worker import jsonlimits
from maas_worker.broker.entries import (
    JOB_QUEUES,
    Refused,
    check_message,
    max_body_chars,
    parse_entry,
    sanitize_headers,
)
from maas_worker.protocol import ARGS_REPR, MONITOR_EXCHANGE, SAMPLE_TASK, TASK_NAME
from maas_worker.settings import Settings

LIMIT = max_body_chars(Settings.from_env({}))
ENVELOPE = base64.b64encode(b"\x01sealed envelope bytes").decode()
QUEUE = "maas.normal"
JOB = "0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1c"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
MAX_ETA_S = 60.0

Send = Callable[..., dict[str, Any]]


@pytest.fixture
def send() -> Iterator[Send]:
    """Send a task as our client does; the queue entry as it would sit in Redis (parsed)."""
    app = Celery("queue-entries-test", broker="memory://", set_as_current=False)

    def _send(
        *,
        task: str = TASK_NAME,
        task_id: str = JOB,
        queue: str = QUEUE,
        args: list[Any] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        app.send_task(
            task,
            args=[ENVELOPE] if args is None else args,
            task_id=task_id,
            queue=queue,
            argsrepr=ARGS_REPR,
            kwargsrepr="{}",
            **options,
        )
        stored = memory.Channel.queues.pop(queue).get_nowait()
        # Round trip through JSON, as the Redis transport stores and reads it.
        entry: dict[str, Any] = json.loads(json.dumps(stored))
        return entry

    yield _send
    app.close()


def body_of(raw: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(raw["body"]))


def with_body(
    raw: dict[str, Any], body: Any = None, *, text: str | bytes | None = None
) -> dict[str, Any]:
    """``raw`` with another body: ``body`` as JSON, or ``text`` as it is (then base64)."""
    raw = copy.deepcopy(raw)
    data = text if text is not None else json.dumps(body)
    raw["body"] = base64.b64encode(data.encode() if isinstance(data, str) else data).decode()
    return raw


def refused(raw: Any, queue: str = QUEUE) -> Refused:
    with pytest.raises(Refused) as err:
        check_message(raw, queue, max_body_chars=LIMIT)
    return err.value


# -- check_message -----------------------------------------------------------------------------
@pytest.mark.parametrize("queue", sorted(JOB_QUEUES))
def test_a_message_sent_by_celery_passes_and_gives_the_task_call(send: Send, queue: str) -> None:
    raw = send(queue=queue)
    call = check_message(raw, queue, max_body_chars=LIMIT)
    assert call is not None
    args, kwargs, embed = call
    assert args == [ENVELOPE]
    assert kwargs == {}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert call == body_of(raw)


def test_a_parsed_entry_passes_the_same(send: Send) -> None:
    text = json.dumps(send())
    raw = parse_entry(text, max_chars=LIMIT)
    assert check_message(raw, QUEUE, max_body_chars=LIMIT) == [[ENVELOPE], {}, body_of(raw)[2]]
    assert parse_entry(text.encode(), max_chars=LIMIT) == raw


@pytest.mark.parametrize("text", ["not json", "[" * 200_000, json.dumps([[[[[]]]]] * 3)[:-1]])
def test_an_entry_that_is_not_bounded_json_parses_to_nothing(text: str) -> None:
    assert parse_entry(text, max_chars=LIMIT) is None


def test_an_entry_over_the_size_limit_parses_to_nothing(send: Send) -> None:
    # The limit is the body's; the headers around it get a fixed allowance.
    text = json.dumps(send(args=["A" * 5000]))
    assert parse_entry(text, max_chars=len(text)) is not None
    assert parse_entry(text + " " * (32 * 1024), max_chars=len(text)) is None


def test_a_sample_message_on_the_monitor_queue_is_checked_but_not_decoded(send: Send) -> None:
    raw = send(task=SAMPLE_TASK, queue=MONITOR_EXCHANGE, args=[])
    assert check_message(raw, MONITOR_EXCHANGE, max_body_chars=LIMIT) is None
    raw = send(task=TASK_NAME, queue=MONITOR_EXCHANGE)
    assert refused(raw, MONITOR_EXCHANGE).reason == "malformed"


def test_celerys_own_queues_are_checked_for_structure_only() -> None:
    raw = {"body": "anything", "properties": {"delivery_tag": "t"}, "headers": {"id": "x"}}
    assert check_message(raw, "celery.pidbox", max_body_chars=LIMIT) is None
    assert refused({"properties": {}}, "celery.pidbox").reason == "malformed"


@pytest.mark.parametrize(
    "task_id",
    [
        "job-1",
        JOB + "\n",
        "\n" + JOB,
        JOB.upper(),
        JOB.replace("-", ""),
        "{" + JOB + "}",
        "urn:uuid:" + JOB,
        JOB[:-1],
        JOB + "0",
        "",
        "0b7e8c6a-3f1d-4c2e-9a7b-5d6e4f3a2b1g",
    ],
    ids=repr,
)
def test_a_task_id_that_is_not_a_canonical_uuid_is_refused(send: Send, task_id: str) -> None:
    raw = send()
    raw["headers"]["id"] = task_id
    err = refused(raw)
    assert err.reason == "malformed"
    assert "UUID" in str(err)


@pytest.mark.parametrize("task_id", [None, 42, [JOB], {"id": JOB}])
def test_a_task_id_that_is_not_a_string_is_refused(send: Send, task_id: Any) -> None:
    raw = send()
    raw["headers"]["id"] = task_id
    assert refused(raw).reason == "malformed"
    del raw["headers"]["id"]
    assert refused(raw).reason == "malformed"


def test_a_real_uuid4_passes(send: Send) -> None:
    job_id = str(uuid.uuid4())
    assert check_message(send(task_id=job_id), QUEUE, max_body_chars=LIMIT) is not None


@pytest.mark.parametrize("workflow", ["callbacks", "errbacks", "chain", "chord"])
def test_a_body_with_a_workflow_is_refused(send: Send, workflow: str) -> None:
    raw = send()
    args, kwargs, embed = body_of(raw)
    signature = {"task": "celery.accumulate", "args": [], "kwargs": {}, "options": {}}
    embed[workflow] = signature if workflow == "chord" else [signature]
    err = refused(with_body(raw, [args, kwargs, embed]))
    assert err.reason == "malformed"
    assert "callbacks" in str(err)


@pytest.mark.parametrize("embed", [None, {}, {"callbacks": [], "chain": None}])
def test_an_empty_workflow_passes(send: Send, embed: Any) -> None:
    raw = with_body(send(), [[ENVELOPE], {}, embed])
    assert check_message(raw, QUEUE, max_body_chars=LIMIT) == [[ENVELOPE], {}, embed]


@pytest.mark.parametrize("depth", [jsonlimits.MAX_MESSAGE_DEPTH, 200_000])
def test_a_body_nested_deeper_than_the_limit_is_refused(send: Send, depth: int) -> None:
    # [[arg], {}, {}] is 2 deep already: the argument makes it deeper than the limit.
    arg = "[" * depth + "]" * depth
    raw = with_body(send(), text=f"[[{arg}], {{}}, {{}}]")
    assert len(raw["body"]) <= LIMIT
    err = refused(raw)
    assert err.reason == "malformed"


def test_a_body_at_the_depth_limit_passes(send: Send) -> None:
    depth = jsonlimits.MAX_MESSAGE_DEPTH - 1  # inside the outer list
    arg = "[" * (depth - 1) + "]" * (depth - 1)
    raw = with_body(send(), text=f"[[{arg}], {{}}, {{}}]")
    assert check_message(raw, QUEUE, max_body_chars=LIMIT) is not None


@pytest.mark.parametrize(
    "body",
    [
        {"args": [ENVELOPE], "kwargs": {}},
        [[ENVELOPE], {}],
        [[ENVELOPE], {}, {}, {}],
        [[ENVELOPE], [], {}],
        [[ENVELOPE], {}, []],
        [[ENVELOPE], {}, "embed"],
        ENVELOPE,
        None,
    ],
    ids=repr,
)
def test_a_body_that_is_not_args_kwargs_embed_is_refused(send: Send, body: Any) -> None:
    err = refused(with_body(send(), body))
    assert err.reason == "malformed"


@pytest.mark.parametrize("text", [b"not json", b"\xff\xfe", b""])
def test_a_body_that_is_not_json_is_refused(send: Send, text: bytes) -> None:
    assert refused(with_body(send(), text=text)).reason == "malformed"


def test_a_body_that_is_not_base64_is_refused(send: Send) -> None:
    raw = send()
    raw["body"] = "%%% not base64 %%%"
    assert refused(raw).reason == "malformed"


def test_a_body_over_the_size_limit_is_oversize(send: Send) -> None:
    raw = send(args=["A" * LIMIT])
    assert refused(raw).reason == "oversize"


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda m: m.update({"content-type": "application/x-python-serialize"}), id="pickle"
        ),
        pytest.param(lambda m: m.update({"content-encoding": "binary"}), id="encoding"),
        pytest.param(lambda m: m["properties"].update({"body_encoding": "rot13"}), id="body-enc"),
        pytest.param(lambda m: m["headers"].update({"task": "celery.chord_unlock"}), id="task"),
        pytest.param(lambda m: m["properties"].pop("delivery_tag"), id="no-tag"),
        pytest.param(lambda m: m["properties"].update({"delivery_info": "x"}), id="info"),
        pytest.param(lambda m: m.update({"headers": ["x"]}), id="headers"),
        pytest.param(lambda m: m.update({"body": 12}), id="body-type"),
    ],
)
def test_other_tampering_is_refused(send: Send, tamper: Callable[[dict[str, Any]], Any]) -> None:
    raw = send()
    tamper(raw)
    assert refused(raw).reason == "malformed"


@pytest.mark.parametrize("raw", [None, [], "text", {"body": ""}, {"properties": []}])
def test_what_is_not_a_kombu_message_is_refused(raw: Any) -> None:
    assert refused(raw).reason == "malformed"


# -- sanitize_headers --------------------------------------------------------------------------
def hostile(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every header a Redis writer could use against a worker."""
    raw["headers"].update(
        {
            "expires": (NOW + timedelta(seconds=1)).isoformat(),
            "timelimit": [1, 1],
            "shadow": "innocent.task",
            "group": "g-1",
            "group_index": 3,
            "stamps": {"on_revoke": ["x"]},
            "stamped_headers": ["on_revoke"],
            "parent_id": "p",
            "root_id": "r",
            "argsrepr": "('the plaintext?',)",
            "kwargsrepr": "{'model': 'x'}",
            "ignore_result": False,
            "replaced_task_nesting": 7,
            "origin": "evil\nlog line",
            "x-unknown": "kept?",
            "lang": "js",
            "retries": -4,
            "eta": (NOW + timedelta(days=365)).isoformat(),
        }
    )
    return raw


def sanitized(raw: dict[str, Any], **kw: Any) -> dict[str, Any]:
    sanitize_headers(raw, max_eta_s=MAX_ETA_S, now=NOW, **kw)
    headers: dict[str, Any] = raw["headers"]
    return headers


def test_hostile_headers_are_replaced_by_the_clients_own(send: Send) -> None:
    raw = hostile(send())
    body = raw["body"]
    headers = sanitized(raw)
    assert headers == {
        "lang": "py",
        "task": TASK_NAME,
        "id": JOB,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": JOB,
        "parent_id": None,
        "argsrepr": ARGS_REPR,
        "kwargsrepr": "{}",
        "origin": None,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    assert raw["body"] == body
    # Still a message the check passes.
    assert check_message(raw, QUEUE, max_body_chars=LIMIT) == body_of(raw)


def test_what_celery_sends_is_kept(send: Send) -> None:
    raw = send()
    original = copy.deepcopy(raw["headers"])
    headers = sanitized(raw)
    assert headers["id"] == headers["root_id"] == JOB
    assert headers["origin"] == original["origin"]
    assert headers["argsrepr"] == original["argsrepr"] == ARGS_REPR
    assert headers["retries"] == original["retries"] == 0
    assert headers["eta"] is None
    assert {k for k, v in headers.items() if v != original[k]} <= {"ignore_result"}


def test_a_near_eta_from_celery_is_kept_a_far_one_dropped(send: Send) -> None:
    now = datetime.now(UTC)
    near = send(countdown=MAX_ETA_S / 2)
    eta = near["headers"]["eta"]
    sanitize_headers(near, max_eta_s=MAX_ETA_S, now=now)
    assert near["headers"]["eta"] == eta
    far = send(countdown=MAX_ETA_S * 100)
    sanitize_headers(far, max_eta_s=MAX_ETA_S, now=now)
    assert far["headers"]["eta"] is None


@pytest.mark.parametrize(
    "eta, kept",
    [
        ((NOW + timedelta(seconds=MAX_ETA_S)).isoformat(), True),
        ((NOW + timedelta(seconds=MAX_ETA_S + 4)).isoformat(), True),  # within the slack
        ((NOW + timedelta(seconds=MAX_ETA_S + 6)).isoformat(), False),
        ((NOW - timedelta(days=3)).isoformat(), True),  # due already
        ((NOW + timedelta(seconds=10)).replace(tzinfo=None).isoformat(), True),  # naive: UTC
        ((NOW + timedelta(days=1)).replace(tzinfo=None).isoformat(), False),
        ("9999-12-31T23:59:59+00:00", False),
        ("tomorrow", False),
        ("2030-13-45T00:00:00", False),
        ("2030-01-01T12:00:00+00:00" + " " * 60, False),  # longer than any timestamp
        (1_900_000_000, False),
        (["2030-01-01T12:00:00"], False),
        (None, False),
    ],
)
def test_eta(send: Send, eta: Any, kept: bool) -> None:
    raw = send()
    raw["headers"]["eta"] = eta
    assert sanitized(raw)["eta"] == (eta if kept else None)


@pytest.mark.parametrize(
    "retries, expected",
    [
        (0, 0),
        (3, 3),
        (999_999, 999_999),
        (10**6, 0),
        (-1, 0),
        (True, 0),
        (2.0, 0),
        ("3", 0),
        (None, 0),
        ([1], 0),
    ],
)
def test_retries_are_a_small_non_negative_int(send: Send, retries: Any, expected: int) -> None:
    raw = send()
    raw["headers"]["retries"] = retries
    assert sanitized(raw)["retries"] == expected


@pytest.mark.parametrize(
    "origin, kept",
    [
        ("gen123@worker-host", True),
        ("", True),
        ("a\nb", False),
        ("\x1b[31mred", False),
        ("x" * 256, False),
        (42, False),
        (None, False),
    ],
)
def test_origin_is_printable_and_short_or_nothing(send: Send, origin: Any, kept: bool) -> None:
    raw = send()
    raw["headers"]["origin"] = origin
    assert sanitized(raw)["origin"] == (origin if kept else None)
