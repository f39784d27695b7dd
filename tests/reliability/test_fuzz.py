"""Scenario 4: fuzzing (hypothesis) what a Redis writer controls.

* envelope opening (`open_envelope`, `verify`, `parse_unverified_header`):
  random bytes, mutated genuine envelopes (bit flips, inserted, deleted and
  replaced runs, splices), truncated and oversized ones, hand-built headers
  with inconsistent lengths and invalid UTF-8;
* the task entry point (`maas.infer`, run through Celery's `apply` against
  a real Redis): any argument list and keyword arguments, wrong types at
  every position, any task id and routing key, claim-check references naming
  any tenant;
* what a client reads back (a result envelope, a cancel token);
* the worker's queue guard (`entries.check_message`) on arbitrary JSON,
  including task ids that are not UUIDs and bodies that are not plain task
  calls (or nest too deeply).

The only outcome allowed for bad input is the generic rejection (one error
type, or an audited rejection reason): never another exception, never a hang
(every example has a deadline).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from maas_worker.backend import keyspace
from maas_worker.backend.audit import REASONS
from maas_worker.broker import entries
from maas_worker.client.client import Client
from maas_worker.crypto.envelope import (
    Header,
    now_ms,
    open_envelope,
    parse_unverified_header,
    seal,
    verify,
)
from maas_worker.errors import EnvelopeRejected, InvalidEnvelope, JobNotSucceeded
from maas_worker.local.embedded import EmbeddedRedis
from maas_worker.protocol import PAYLOAD_REF_PREFIX, payload_ref, payload_ref_tenant
from maas_worker.settings import Settings
from maas_worker.tenancy.cancellation import make_token, verify_token
from maas_worker.tenancy.keyring import save_keyring

from .conftest import SIZE, TENANTS, make_keyring

pytestmark = pytest.mark.reliability

RING = make_keyring()
MAX_BYTES = 64 * 1024
REJECTIONS = REASONS - {"replayed", "rate_limited", "model_rejected"}
FUZZ = settings(
    database=None,
    deadline=timedelta(seconds=2),
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
_cases: dict[str, int] = {}


def _count(name: str) -> None:
    _cases[name] = _cases.get(name, 0) + 1


# -- strategies ----------------------------------------------------------------------------------
texts = st.text(min_size=1, max_size=40)
#: Cancel requests as a Redis writer could store them: ``tenant:version:mac``
#: with any version text (other digits, huge numbers) and any 64 characters.
tokens = st.builds(
    lambda t, v, m: f"{t}:{v}:{m}",
    st.sampled_from(TENANTS),
    st.one_of(
        st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=3),
        st.text(st.sampled_from("0123456789"), min_size=4000, max_size=6000),
        st.text(max_size=20),
    ),
    st.one_of(
        st.text(st.sampled_from("0123456789abcdef"), min_size=64, max_size=64),
        st.text(min_size=64, max_size=64),
    ),
)
priorities = st.sampled_from(["high", "normal", "low"])


@st.composite
def genuine(draw: st.DrawFn, kind: str = "request") -> tuple[Header, bytes]:
    """A real envelope, sealed with a real tenant key (fields are plausible but arbitrary)."""
    tenant = draw(st.sampled_from(TENANTS))
    issued = now_ms() + draw(st.integers(-10_000, 10_000))
    header = Header(
        kind,
        1,
        issued,
        issued + draw(st.integers(1, 3_600_000)),
        draw(priorities),
        tenant,
        draw(st.one_of(st.just(str(uuid.uuid4())), texts)),
        draw(st.sampled_from(["maas.infer", "maas.sample"])),
        draw(st.sampled_from(["echo", "echo@1", "sleep", "digits", "nope"])),
        bytes(32) if kind == "result" else None,
    )
    try:
        header.digest()
    except ValueError:  # a drawn string over 255 bytes of UTF-8: keep it short
        header = Header(
            kind,
            1,
            issued,
            issued + 60_000,
            "normal",
            tenant,
            "job",
            "maas.infer",
            "echo",
            header.request_hash,
        )
    plaintext = draw(
        st.one_of(
            st.binary(max_size=256),
            st.builds(
                lambda v: json.dumps(v).encode(),
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: (
                        st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=8), c, max_size=4)
                    ),
                    max_leaves=10,
                ),
            ),
        )
    )
    return header, seal(RING.tenant(tenant).primary().keys(tenant), header, plaintext)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> tuple[bytes, set[bytes]]:
    """(the mutated bytes, every genuine envelope that went into them)."""
    data = bytearray(base)
    sources = {base}
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(
                ["flip", "set", "insert", "delete", "truncate", "extend", "header_len", "splice"]
            )
        )
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "header_len" and len(data) >= 4:
            data[2:4] = struct.pack(">H", draw(st.integers(0, 0xFFFF)))
        elif op == "splice":
            other = draw(genuine())[1]
            sources.add(other)
            data[pos:] = other[pos:]
    return bytes(data), sources


@st.composite
def handmade(draw: st.DrawFn) -> bytes:
    """A header built byte by byte: any lengths, any string bytes, any header_len."""
    strings = b"".join(
        bytes([len(s)]) + s
        for s in (draw(st.binary(max_size=12)) for _ in range(draw(st.integers(0, 5))))
    )
    fixed = struct.pack(
        ">BBHIQQB",
        draw(st.sampled_from([1, 1, 1, 0, 2, 255])),
        draw(st.sampled_from([1, 2, 0, 3])),
        draw(st.integers(0, 400)),
        draw(st.integers(0, 3)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 4)),
    )
    return fixed + strings + draw(st.binary(max_size=160))


@st.composite
def untrusted(draw: st.DrawFn, kind: str = "request") -> tuple[bytes, bytes | None]:
    """(bytes to open, the genuine envelope they equal if they were not changed at all)."""
    choice = draw(
        st.sampled_from(["random", "mutated", "mutated", "handmade", "oversize", "other_kind"])
    )
    if choice == "random":
        return draw(st.binary(max_size=2048)), None
    if choice == "handmade":
        return draw(handmade()), None
    if choice == "oversize":
        _, env = draw(genuine(kind))
        return env + bytes(MAX_BYTES), None
    if choice == "other_kind":
        return draw(genuine("result" if kind == "request" else "request"))[1], None
    _, env = draw(genuine(kind))
    data, sources = draw(mutated(env))
    return data, (data if data in sources else None)


# -- envelope opening ---------------------------------------------------------------------------
@settings(FUZZ, max_examples=SIZE.fuzz_envelope)
@given(case=untrusted())
def test_opening_untrusted_bytes_fails_only_with_the_generic_error(
    case: tuple[bytes, bytes | None],
) -> None:
    _count("envelope")
    data, identical = case
    try:
        verify(data, expect="request", keyring=RING, max_bytes=MAX_BYTES)
    except EnvelopeRejected as exc:
        assert exc.reason in REJECTIONS
    try:
        parse_unverified_header(data)
    except EnvelopeRejected as exc:
        assert exc.reason == "malformed"
    try:
        open_envelope(data, expect="request", keyring=RING, max_bytes=MAX_BYTES)
    except InvalidEnvelope as exc:
        assert type(exc) is InvalidEnvelope and str(exc) == "invalid envelope"
    else:
        assert identical is not None  # only an unchanged genuine envelope opens


# -- what a client reads back -----------------------------------------------------------------
@settings(FUZZ, max_examples=SIZE.fuzz_result)
@given(
    case=untrusted("result"),
    token=st.one_of(st.none(), st.binary(max_size=120), st.text(max_size=120), tokens),
)
def test_a_client_opening_what_redis_holds_fails_only_with_the_generic_error(
    case: tuple[bytes, bytes | None], token: Any
) -> None:
    _count("result")
    data, _ = case
    client = Client(settings=Settings.from_env({"MAAS_TENANT": "acme"}), keyring=RING)
    job = client.job(str(uuid.uuid4()))
    with pytest.raises(InvalidEnvelope):
        job._open(data)
    assert verify_token(token, RING, "acme", job.id) is False
    assert verify_token(make_token(RING, "acme", job.id), RING, "acme", job.id)


# -- the queue guard ------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=12), c, max_size=5),
    max_leaves=25,
)


def _message(task_id: str, envelope: str) -> dict[str, Any]:
    body = json.dumps([[envelope], {}, {}]).encode()
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "maas.infer", "id": task_id},
        "properties": {
            "delivery_tag": task_id,
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "maas.high"},
        },
    }


#: Task ids as a Redis writer could set them: UUIDs in other forms, and anything else.
task_ids = st.one_of(
    st.builds(lambda: str(uuid.uuid4()).upper()),
    st.builds(lambda: uuid.uuid4().hex),
    st.builds(lambda: f"{{{uuid.uuid4()}}}"),
    st.builds(lambda: f" {uuid.uuid4()}"),
    st.text(max_size=40),
    json_values,
)


@st.composite
def bodies(draw: st.DrawFn) -> str:
    """A base64 body that decodes to anything, a task call or not, nested up to very deep."""
    choice = draw(st.sampled_from(["json", "call", "workflow", "deep", "bytes"]))
    if choice == "bytes":
        return base64.b64encode(draw(st.binary(max_size=64))).decode()
    if choice == "json":
        text = json.dumps(draw(json_values))
    elif choice == "call":
        text = json.dumps([draw(json_values), draw(json_values), draw(json_values)])
    elif choice == "workflow":
        embed = {
            draw(st.sampled_from(["callbacks", "errbacks", "chain", "chord"])): draw(json_values)
        }
        text = json.dumps([["QUJD"], {}, embed])
    else:
        n = draw(st.integers(1, 200_000))
        text = (
            "[" * n + "]" * n
            if draw(st.booleans())
            else '[["QUJD"],{},' + '{"a":' * n + "1" + "}" * n + "]"
        )
    return base64.b64encode(text.encode()).decode()


@st.composite
def raw_messages(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(json_values)
    msg = _message(str(uuid.uuid4()), "QUJD")
    for _ in range(draw(st.integers(1, 3))):  # replace any one value, at any depth
        where: Any = msg
        path = draw(
            st.sampled_from(
                [
                    ("body",),
                    ("content-type",),
                    ("headers",),
                    ("headers", "task"),
                    ("headers", "id"),
                    ("properties",),
                    ("properties", "delivery_tag"),
                    ("properties", "delivery_info"),
                    ("properties", "body_encoding"),
                ]
            )
        )
        for key in path[:-1]:
            where = where.get(key) if isinstance(where, dict) else None
        if isinstance(where, dict):
            values = (
                task_ids
                if path == ("headers", "id")
                else st.one_of(json_values, bodies())
                if path == ("body",)
                else json_values
            )
            where[path[-1]] = draw(values)
    return msg


@settings(FUZZ, max_examples=SIZE.fuzz_queue)
@given(
    raw=raw_messages(),
    queue=st.sampled_from(["maas.high", "maas.low", "maas.monitor", "celery.pidbox", "other"]),
    limit=st.sampled_from([4096, 1 << 20]),
)
def test_the_queue_guard_refuses_or_passes_never_raises(raw: Any, queue: str, limit: int) -> None:
    _count("queue")
    try:
        call = entries.check_message(raw, queue, max_body_chars=limit)
    except entries.Refused as exc:
        assert exc.reason in ("malformed", "oversize")
        return
    # What passes onto a job queue has a canonical task id and is a plain task call.
    if queue in entries.JOB_QUEUES:
        assert keyspace.is_job_id(raw["headers"]["id"])
        assert isinstance(call, list) and len(call) == 3 and isinstance(call[1], dict)
        assert not any((call[2] or {}).get(k) for k in ("callbacks", "errbacks", "chain", "chord"))
    else:
        assert call is None


# -- the task entry point ----------------------------------------------------------------------
class _Outcomes(logging.Handler):
    """Collects the outcome the pipeline logs for each job (``job %r %s``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg in ("job %r %s", "job %s %s") and isinstance(record.args, tuple):
            word = str(record.args[1])
            # A failure is logged with its code ("failed: bad_input"): the outcome is "failed".
            self.last = "failed" if word.startswith("failed:") else word


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, _Outcomes]]:
    """This process as a worker process: a real Redis server, the keyring, the runtime."""
    import redis

    from maas_worker.worker import runtime, tasks

    tmp: Path = tmp_path_factory.mktemp("fuzz")
    server = EmbeddedRedis().start()
    keyring_path = tmp / "keyring.json"
    save_keyring(keyring_path, RING)
    env = {
        "MAAS_BROKER_URL": server.url,
        "MAAS_KEYRING": str(keyring_path),
        "MAAS_DIAGNOSTIC_MODELS": "1",
        "MAAS_MODEL_DIR": str(tmp / "models"),
        "MAAS_AUDIT_MAXLEN": "10000000",
        "MAAS_METRICS_PORT": "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    runtime._runtime = None
    handler = _Outcomes()
    tasks.log.addHandler(handler)
    level = tasks.log.level
    tasks.log.setLevel(logging.INFO)
    backend = redis.Redis.from_url(server.url)
    try:
        yield backend, handler
    finally:
        tasks.log.removeHandler(handler)
        tasks.log.setLevel(level)
        runtime._runtime = None
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        backend.close()
        server.stop()


class TaskCall(NamedTuple):
    """One call of the task entry point and what a Redis writer left for it."""

    args: list[Any]
    kwargs: dict[str, Any]
    task_id: str
    routing: str | None
    #: A cancel request found under this tenant's cancel key of the task id.
    cancel_tenant: str
    cancel: str | bytes | None
    #: What the payload key of the tenant a claim-check reference names holds.
    payload: Any
    #: Whether it is a genuine, unaltered job bound to its task id, queue and reference.
    bound: bool


@st.composite
def task_calls(draw: st.DrawFn) -> TaskCall:
    header, env = draw(genuine())
    data, _ = draw(untrusted())
    text = draw(st.sampled_from(["genuine", "b64", "text", "huge", "payload"]))
    # A claim-check reference: to the job's own tenant, another tenant, one
    # that does not exist, an invalid name, or the old form without a tenant.
    ref = draw(
        st.one_of(
            st.just(payload_ref(header.tenant)),
            st.sampled_from([payload_ref(t) for t in TENANTS]),
            st.just(payload_ref("nosuchtenant")),
            st.builds(lambda t: PAYLOAD_REF_PREFIX + t, st.text(max_size=12)),
            st.just(PAYLOAD_REF_PREFIX.rstrip(":")),
        )
    )
    arg: Any = {
        "genuine": base64.b64encode(env).decode(),
        "b64": base64.b64encode(data).decode(),
        "text": draw(st.text(max_size=200)),
        "huge": "A" * draw(st.integers(1 << 20, 3 << 20)),
        "payload": ref,
    }[text]
    # What a claim-checked request points at: untrusted bytes, or a key of
    # another type, or nothing.
    payload = draw(
        st.one_of(
            st.just(data), st.just(env), st.none(), st.sampled_from([["list"], {"hash": "x"}])
        )
    )
    args: list[Any] = [arg]
    if draw(st.booleans()):  # wrong types, missing or extra values at any position
        args = draw(st.lists(st.one_of(json_values, st.just(arg)), max_size=3))
    kwargs = draw(
        st.one_of(st.just({}), st.dictionaries(st.text(max_size=10), json_values, max_size=3))
    )
    task_id = draw(st.one_of(st.just(header.job_id), st.text(min_size=1, max_size=300)))
    routing = draw(
        st.one_of(
            st.none(),
            st.sampled_from(["maas.high", "maas.normal", "maas.low"]),
            st.text(max_size=20),
        )
    )
    cancel_tenant = draw(st.one_of(st.just(header.tenant), st.sampled_from(TENANTS)))
    cancel = draw(st.one_of(st.none(), tokens, st.binary(max_size=80)))
    return TaskCall(
        args,
        kwargs,
        task_id,
        routing,
        cancel_tenant,
        cancel,
        payload,
        _bound(args, kwargs, task_id, routing, payload),
    )


def _bound(
    args: list[Any], kwargs: dict[str, Any], task_id: str, routing: str | None, payload: Any
) -> bool:
    """True for a genuine request that a worker must accept: one argument that
    verifies, bound to this task id and queue, and (claim-checked) found under
    its own tenant's payload key (whichever strategy built it)."""
    if kwargs or len(args) != 1 or not isinstance(args[0], str):
        return False
    ref_tenant = payload_ref_tenant(args[0])
    if ref_tenant == "":
        return False  # a reference that names no valid tenant
    try:
        data = payload if ref_tenant is not None else base64.b64decode(args[0], validate=True)
        if not isinstance(data, bytes):
            return False
        header = verify(data, expect="request", keyring=RING, max_bytes=MAX_BYTES).header
    except (InvalidEnvelope, ValueError):
        return False
    return (
        header.job_id == task_id
        and header.task == "maas.infer"
        and routing in (None, f"maas.{header.priority}")
        and ref_tenant in (None, header.tenant)
    )


def _payload_key(arg: Any, task_id: str) -> str | None:
    """The key a worker reads the claim-checked request of ``arg`` from (None: no reference)."""
    tenant = payload_ref_tenant(arg) if isinstance(arg, str) else None
    return keyspace.payload(tenant, task_id) if tenant else None


@settings(FUZZ, max_examples=SIZE.fuzz_task)
@given(call=task_calls())
def test_the_task_entry_point_rejects_bad_input_and_never_raises(
    worker_env: tuple[Any, _Outcomes], call: TaskCall
) -> None:
    from maas_worker.worker.tasks import infer

    _count("task")
    backend, outcomes = worker_env
    task_id = call.task_id
    if call.cancel is not None:
        backend.set(keyspace.cancel(call.cancel_tenant, task_id), call.cancel)
    for arg in call.args:
        key = _payload_key(arg, task_id)
        if key is None:
            continue
        backend.delete(key)
        if isinstance(call.payload, bytes):
            backend.set(key, call.payload)
        elif isinstance(call.payload, list):
            backend.rpush(key, *call.payload)
        elif isinstance(call.payload, dict):
            backend.hset(key, mapping=call.payload)
    audited = backend.xlen(keyspace.AUDIT_STREAM)
    outcomes.last = None
    result = infer.apply(
        args=call.args, kwargs=call.kwargs, task_id=task_id, routing_key=call.routing
    )
    # Never an error of its own: SUCCESS for a job that succeeded, else the
    # JobNotSucceeded that makes its task event (Flower) say FAILURE.
    assert result.result is None or isinstance(result.result, JobNotSucceeded), result.traceback
    assert (result.state == "SUCCESS") == (outcomes.last == "succeeded"), result.traceback
    event(f"{'bound' if call.bound else 'unbound'}: {outcomes.last}")
    if call.bound:
        # A genuine job: it may run (an authenticated tenant's input, any
        # JSON) or be refused by policy or time; never raise.
        assert outcomes.last in {
            "succeeded",
            "failed",
            "replayed",
            "policy",
            "expired",
            "malformed",
        }
    else:
        assert outcomes.last in REJECTIONS, outcomes.last
        assert backend.xlen(keyspace.AUDIT_STREAM) > audited  # every rejection is audited


def test_fuzz_case_count(report: Any) -> None:
    """Runs last in this module: reports how many cases the fuzzers executed."""
    total = sum(_cases.values())
    report(fuzz_cases=total, **{f"fuzz_{k}": v for k, v in sorted(_cases.items())})
    assert total >= (SIZE.fuzz_envelope + SIZE.fuzz_task + SIZE.fuzz_result + SIZE.fuzz_queue) * 0.9
