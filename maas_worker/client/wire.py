"""The job messages of `AsyncClient`, built by the very code `Client` sends them with.

`Client` sends through Celery's producer on kombu's Redis transport, which
blocks. The async client needs the same bytes without that I/O: it asks
Celery (``send_task``, the same call with the same arguments, `send_args`)
to publish into kombu's in-memory transport, takes the framed message back
out (headers, properties, base64 body: kombu's virtual channel frames it
exactly as its Redis channel does) and pushes it with ``redis.asyncio``
itself. Nothing is parsed or framed here by hand, so the wire format cannot
drift from the sync client's.

The one difference: no task-sent event (the sync client publishes one when
its Redis user may publish, which a producer role may not). Flower shows an
async client's job from the moment a worker receives it.
"""

from __future__ import annotations

import json
from typing import Any

from celery import Celery
from kombu import Connection, Producer  # type: ignore[attr-defined]

from maas_worker.broker import fetch
from maas_worker.broker.app import make_producer_app
from maas_worker.client.core import Sealed, message_arg
from maas_worker.protocol import ARGS_REPR, TASK_NAME, payload_ref
from maas_worker.settings import Settings


def send_args(tenant: str, header_job_id: str, raw: bytes, queue: str) -> dict[str, Any]:
    """The keywords of Celery's ``send_task`` for one sealed request (both clients)."""
    return {
        "args": [message_arg(payload_ref(tenant), raw)],  # base64 only what travels inside
        "task_id": header_job_id,
        "queue": queue,
        # Celery copies args into message headers and events for display; say
        # what it is instead of repeating the ciphertext.
        "argsrepr": ARGS_REPR,
        "kwargsrepr": "{}",
        # Declare nothing: the job queues are the workers' (they bind them), and a
        # producer's Redis user may only push to them (docs/security.md, Redis roles).
        "declare": [],
        # A message property: the producer's channel pushes the job to this
        # tenant's list of the queue (fair share, broker/fetch.py).
        fetch.TENANT_PROPERTY: tenant,
    }


class MessageBuilder:
    """Frames job messages in memory (kombu's ``memory://`` transport): no I/O."""

    def __init__(self, settings: Settings) -> None:
        self._app: Celery = make_producer_app(settings)
        self._app.conf.task_send_sent_event = False
        self._conn = Connection("memory://")  # type: ignore[no-untyped-call]
        self._channel: Any = self._conn.channel()  # type: ignore[no-untyped-call]
        self._producer = Producer(self._channel)  # type: ignore[no-untyped-call]

    def messages(self, tenant: str, sealed: list[Sealed], queue: str) -> list[str]:
        """The JSON text of each job's message for ``queue``, as kombu's Redis channel
        pushes it (to the tenant's list of ``queue``: `fetch.push`)."""
        out = []
        for header, raw in sealed:
            self._app.send_task(
                TASK_NAME,
                producer=self._producer,
                **send_args(tenant, header.job_id, raw, queue),
            )
            out.append(json.dumps(self._channel._get(queue)))
        return out

    def close(self) -> None:
        """Release the in-memory channel."""
        self._channel.close()
        self._conn.release()  # type: ignore[no-untyped-call]
        self._app.close()
