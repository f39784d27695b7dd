"""The queue entries the clients build (wire.py) are the bytes Celery and kombu produce.

The oracle is Celery itself: ``send_task`` with the arguments the clients used
to pass it, published through kombu's virtual transport (in memory; its Redis
channel frames a message the same way and stores ``json.dumps`` of it, which
is what the oracle's text is). Fields that differ between two messages of the
same job by design:

* ``properties.delivery_tag``: kombu draws a fresh UUID4 per message;
* ``properties.reply_to``: Celery's id of the sending app and thread; ours is
  drawn once per builder. Nothing reads it (results never travel by reply).

Everything else, ``origin`` included (``gen<pid>@<host>`` of this process),
must be byte-identical.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Producer  # type: ignore[attr-defined]

from maas_worker.broker import fetch
from maas_worker.broker.app import make_producer_app
from maas_worker.broker.entries import check_message, max_body_chars
from maas_worker.client.core import INLINE_MAX_BYTES, Sealed, message_arg
from maas_worker.client.wire import MessageBuilder, sent_event_fields, uuid4_texts
from maas_worker.crypto.envelope import Header
from maas_worker.protocol import ARGS_REPR, QUEUE_NAMES, TASK_NAME, payload_ref
from maas_worker.settings import Settings

TAG = re.compile(r'"delivery_tag": "([0-9a-f-]{36})"')
REPLY_TO = re.compile(r'"reply_to": "([0-9a-f-]{36})"')


def _sealed(tenant: str, size: int, priority: str = "normal") -> Sealed:
    header = Header(
        "request",
        3,
        1_700_000_000_000,
        1_700_000_600_000,
        priority,
        tenant,
        str(uuid.uuid4()),
        TASK_NAME,
        "echo",
    )
    return header, bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)


class CeleryOracle:
    """Celery's own entry for a job: what the clients sent through ``send_task`` before."""

    def __init__(self) -> None:
        self.app: Celery = make_producer_app(Settings())
        self.app.conf.task_send_sent_event = False
        self.conn = Connection("memory://")  # type: ignore[no-untyped-call]
        self.channel: Any = self.conn.channel()  # type: ignore[no-untyped-call]
        self.producer = Producer(self.channel)  # type: ignore[no-untyped-call]

    def entry(self, tenant: str, sealed: Sealed, queue: str) -> str:
        header, raw = sealed
        self.app.send_task(
            TASK_NAME,
            producer=self.producer,
            args=[message_arg(payload_ref(tenant), raw)],
            task_id=header.job_id,
            queue=queue,
            argsrepr=ARGS_REPR,
            kwargsrepr="{}",
            declare=[],
            **{fetch.TENANT_PROPERTY: tenant},
        )
        return json.dumps(self.channel._get(queue))

    def close(self) -> None:
        self.channel.close()
        self.conn.release()  # type: ignore[no-untyped-call]
        self.app.close()


@pytest.fixture
def oracle() -> Iterator[CeleryOracle]:
    o = CeleryOracle()
    yield o
    o.close()


@pytest.mark.parametrize("queue", QUEUE_NAMES)
@pytest.mark.parametrize("size", [0, 1, 1024, INLINE_MAX_BYTES, INLINE_MAX_BYTES + 1])
def test_an_entry_is_celerys_message_byte_for_byte(
    oracle: CeleryOracle, queue: str, size: int
) -> None:
    tenant = "acme.eu-1_x"
    builder = MessageBuilder()
    batch = [_sealed(tenant, size), _sealed(tenant, size + 3)]
    ours = builder.messages(tenant, batch, queue)
    assert len(ours) == 2
    for sealed, entry in zip(batch, ours, strict=True):
        assert isinstance(entry, bytes)
        text = entry.decode("ascii")
        theirs = oracle.entry(tenant, sealed, queue)
        # The two per-message fields (module docstring) are taken from ours.
        (tag,) = TAG.findall(text)
        theirs = TAG.sub(f'"delivery_tag": "{tag}"', theirs)
        theirs = REPLY_TO.sub(f'"reply_to": "{builder.reply_to}"', theirs)
        assert text == theirs
        # And the worker's check takes it as the task call of that very envelope.
        args, kwargs, _ = check_message(
            json.loads(text), queue, max_body_chars=max_body_chars(Settings())
        )
        assert args == [message_arg(payload_ref(tenant), sealed[1])] and kwargs == {}


def test_every_entry_has_its_own_delivery_tag() -> None:
    tenant = "acme"
    ours = MessageBuilder().messages(tenant, [_sealed(tenant, 10) for _ in range(200)], "maas.low")
    tags = [json.loads(t)["properties"]["delivery_tag"] for t in ours]
    assert len(set(tags)) == 200


def test_delivery_tags_are_canonical_uuid4s() -> None:
    for text in uuid4_texts(500):
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_a_job_id_that_is_not_a_uuid_is_refused_not_laid_out() -> None:
    # The builder escapes nothing per job: a job id must be a canonical UUID (the
    # clients and the gateway check it before; this is the last line).
    header, raw = _sealed("acme", 10)
    bad = replace(header, job_id='x", "task": "evil')
    with pytest.raises(ValueError, match="canonical UUID"):
        MessageBuilder().messages("acme", [(bad, raw)], "maas.normal")


class _SentEvents:
    """Celery's ``event_dispatcher`` hook of ``send_task``: keeps what it would publish."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **_: Any) -> None:
        self.sent.append((type, dict(fields)))


@pytest.mark.parametrize("queue", QUEUE_NAMES)
def test_the_task_sent_event_has_celerys_fields(oracle: CeleryOracle, queue: str) -> None:
    # What Celery's send_task publishes as task-sent for the same job.
    oracle.app.conf.task_send_sent_event = True
    events = _SentEvents()
    header, raw = _sealed("acme", 100)
    oracle.app.send_task(
        TASK_NAME,
        producer=oracle.producer,
        args=[message_arg(payload_ref("acme"), raw)],
        task_id=header.job_id,
        queue=queue,
        argsrepr=ARGS_REPR,
        kwargsrepr="{}",
        declare=[],
        event_dispatcher=events,
    )
    oracle.channel._get(queue)  # kombu's memory queues are shared by the whole process
    assert events.sent == [("task-sent", sent_event_fields(header.job_id, queue))]
