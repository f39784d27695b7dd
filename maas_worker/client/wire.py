"""The queue entries of sealed requests, built directly, once per batch (every client).

A queue entry is kombu's Redis JSON message around a Celery protocol 2 task
call (docs/protocol.md 3.6 specifies it byte by byte). Clients used to have
Celery's ``send_task`` frame each one (the sync client through kombu's Redis
transport, the async client and the gateway through kombu's in-memory one):
about half of a producer's time per job, for a message whose only parts that
change from job to job are the job id, the envelope and kombu's delivery tag
(docs/benchmarks.md, "Throughput"). `MessageBuilder` lays out the same JSON
text itself: what is the same for every job of a batch (tenant, queue, the
producer's origin) is escaped once per batch, and the per-job parts are a job
id (a canonical UUID), base64 text and a fresh UUID4, none of which needs
escaping. tests/unit/test_wire.py compares the bytes with what Celery and
kombu produce for the same job, field for field and byte for byte, so the
format cannot drift from theirs unnoticed; pushing the entries is
`fetch.push` (one ``MULTI`` per batch).

Celery's ``task-sent`` event is not part of an entry: the sync client
publishes the events of a batch as one buffered message, when its Redis user
may publish (client.py).
"""

from __future__ import annotations

import binascii
import json
import os
import socket
import uuid
from typing import Any

from maas_worker.backend import keyspace
from maas_worker.client.core import INLINE_MAX_BYTES, Sealed
from maas_worker.protocol import ARGS_REPR, TASK_NAME, payload_ref

#: The task call's ``kwargs`` and ``embed`` (no callbacks, chain or chord), as
#: kombu's JSON serialiser writes them after the argument list.
_BODY_TAIL = b'"], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
#: The fields of an entry, in the order Celery and kombu write them; ``{..}`` are
#: filled per batch (`_batch_parts`), ``%s`` per job: body, id, root id,
#: correlation id, delivery tag.
_ENTRY = (
    '{"body": "%s", "content-encoding": "utf-8", "content-type": "application/json", '
    '"headers": {"lang": "py", "task": {task}, "id": "%s", "shadow": null, "eta": null, '
    '"expires": null, "group": null, "group_index": null, "retries": 0, '
    '"timelimit": [null, null], "root_id": "%s", "parent_id": null, '
    '"argsrepr": {argsrepr}, "kwargsrepr": "{}", "origin": {origin}, '
    '"ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, '
    '"stamps": {}}, '
    '"properties": {"correlation_id": "%s", "reply_to": {reply_to}, '
    '"argsrepr": {argsrepr}, "kwargsrepr": "{}", "maas_tenant": {tenant}, '
    '"delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": {queue}}, '
    '"priority": 0, "body_encoding": "base64", "delivery_tag": "%s"}}'
)


def _batch_parts(**fields: str) -> tuple[bytes, ...]:
    """`_ENTRY` cut at its ``%s``, with the batch's fields JSON-escaped in: the six
    pieces a job's parts go between (joined, not formatted: a 3 KB ``%`` format per
    job was the builder's largest cost)."""
    parts = []
    for piece in _ENTRY.split("%s"):
        filled = piece
        for name, value in fields.items():
            filled = filled.replace("{" + name + "}", json.dumps(value))
        parts.append(filled.encode())
    return tuple(parts)


def uuid4_texts(n: int) -> list[str]:
    """``n`` random UUID4s in canonical text form, from one read of the OS RNG.

    What ``str(uuid.uuid4())`` gives, a third of its cost: kombu's delivery tags.
    """
    pool = os.urandom(16 * n)
    out = []
    for i in range(0, 16 * n, 16):
        b = bytearray(pool[i : i + 16])
        b[6] = (b[6] & 0x0F) | 0x40  # version 4
        b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
        h = b.hex()
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


class MessageBuilder:
    """Builds the queue entries of sealed requests (no I/O, no Celery)."""

    def __init__(self) -> None:
        #: Celery's ``reply_to``: an id per producer (Celery's is per app and thread);
        #: nothing reads it, since results never travel by reply.
        self.reply_to = str(uuid.uuid4())
        self._templates: dict[tuple[str, str, str], tuple[bytes, ...]] = {}

    @staticmethod
    def origin() -> str:
        """Celery's ``origin`` header: ``gen<pid>@<host>`` (what Flower shows as the
        producer); read per batch, so a forked producer names its own pid."""
        return f"gen{os.getpid()}@{socket.gethostname()}"

    def _template(self, tenant: str, queue: str) -> tuple[bytes, ...]:
        origin = self.origin()
        key = (tenant, queue, origin)
        template = self._templates.get(key)
        if template is None:
            template = _batch_parts(
                task=TASK_NAME,
                argsrepr=ARGS_REPR,
                origin=origin,
                reply_to=self.reply_to,
                tenant=tenant,
                queue=queue,
            )
            if len(self._templates) > 64:  # a gateway with many tenants: stay bounded
                self._templates.clear()
            self._templates[key] = template
        return template

    def messages(self, tenant: str, sealed: list[Sealed], queue: str) -> list[bytes]:
        """The JSON of each job's queue entry for ``queue`` (ASCII bytes), as pushed to
        the tenant's list of it (`fetch.push`): docs/protocol.md 3.6."""
        # The six fixed pieces; a job's body, id (three times) and tag go between.
        p = self._template(tenant, queue)
        ref = payload_ref(tenant).encode()
        b64 = binascii.b2a_base64  # base64.b64encode's own call, without its wrapper
        tags = uuid4_texts(len(sealed))
        out = []
        for (header, raw), tag in zip(sealed, tags, strict=True):
            # The argument is base64 text or a claim-check reference (a valid tenant
            # name): JSON-safe as it is, like the job id (a canonical UUID). The
            # choice `message_arg` makes, inlined (test_wire.py compares the bytes).
            arg = ref if len(raw) > INLINE_MAX_BYTES else b64(raw, newline=False)
            body = b64(b'[["' + arg + _BODY_TAIL, newline=False)
            job = header.job_id
            if not keyspace.is_job_id(job):  # laid out unescaped: it must be a UUID
                raise ValueError("a job id must be a canonical UUID")
            j = job.encode()
            out.append(b"".join((p[0], body, p[1], j, p[2], j, p[3], j, p[4], tag.encode(), p[5])))
        return out


def sent_event_fields(job_id: str, queue: str) -> dict[str, Any]:
    """The fields of Celery's ``task-sent`` event for a job sent to ``queue`` (what
    ``send_task`` publishes for it, so Flower lists the job from the moment it is
    queued)."""
    return {
        "uuid": job_id,
        "root_id": job_id,
        "parent_id": None,
        "name": TASK_NAME,
        "args": ARGS_REPR,
        "kwargs": "{}",
        "retries": 0,
        "eta": None,
        "expires": None,
        "queue": queue,
        "exchange": "",
        "routing_key": queue,
    }
