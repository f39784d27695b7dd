"""The queued markers of a batch (docs/protocol.md 3.9), written by one library call.

A producer marks each job it pushed as queued (``maas:{T}:job:<id>``, holding
the job's ``expires_at_ms``); the HTTP gateway also records each job id with
its envelope's hash first (idempotency on the job id). Both write a whole
batch with one ``FCALL`` of `functions.MARK_QUEUED` (``mark_queued.lua``),
every key in ``KEYS``, answered by one string of one character per job: one
command and one reply per batch where a pipeline of ``SET``s costs a
command and a reply per job (docs/benchmarks.md, the gateway section).

A server whose library predates the function, under a Redis user that may not
load it (a rolling upgrade: the operator has not yet run ``maas-worker acl
--load-functions``, no new worker has started), gets the same writes as
per-job ``SET``s instead (`MarkerWrite.fill`: one pipeline for markers, two
for a claim: the records, then the markers of the new ids), the way markers
were written before; its replies read as the same characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from maas_worker.backend import functions, keyspace
from maas_worker.crypto.envelope import Header

#: The marker was written.
MARKED = "q"
#: (gateway) The job id is new; a marker was there already and was kept.
KEPT = "k"
#: (gateway) The job id was recorded before for the same envelope: a repeat.
SAME = "s"
#: (gateway) The job id was recorded before for another envelope.
CONFLICT = "c"
#: Jobs per call at most: a function runs alone on the server, so a very large
#: `submit_many` is written in several calls (one round trip each) rather than
#: one that holds every other client back for its whole length.
CHUNK_JOBS = 1000


def marker_ttl_s(header: Header, result_ttl_s: int) -> int:
    """A marker's TTL: the job's lifetime in whole seconds plus the result TTL."""
    return (header.expires_at_ms - header.issued_at_ms) // 1000 + result_ttl_s


@dataclass(frozen=True)
class MarkerWrite:
    """One batch's markers (and, with ``claim``, idempotency records): the ``FCALL``'s
    keys and arguments, and what to send instead where the library cannot be had."""

    #: Each job's marker key, then (``claim``) each job's idempotency record key.
    keys: list[str]
    #: Per job: (expires_at_ms, marker TTL s), or (``claim``) (expires_at_ms, marker
    #: TTL s, envelope hash, record TTL s).
    fields: list[tuple[Any, ...]]
    claim: bool

    @property
    def args(self) -> list[str]:
        """The ``FCALL``'s arguments: the mode, then every job's fields in one string."""
        return [
            "claim" if self.claim else "mark",
            " ".join(map(str, chain.from_iterable(self.fields))),
        ]

    def chunks(self) -> list[MarkerWrite]:
        """This write cut into writes of at most `CHUNK_JOBS` jobs, in order."""
        n = len(self.fields)
        if n <= CHUNK_JOBS:
            return [self]
        out = []
        for lo in range(0, n, CHUNK_JOBS):
            hi = min(lo + CHUNK_JOBS, n)
            keys = self.keys[lo:hi] + (self.keys[n + lo : n + hi] if self.claim else [])
            out.append(MarkerWrite(keys, self.fields[lo:hi], self.claim))
        return out

    def fill(self, pipe: Any) -> None:
        """The fallback's first pipeline: ``SET`` of each marker, or, with ``claim``,
        ``SET NX GET`` of each idempotency record (then `fill_markers`)."""
        n = len(self.fields)
        for i, job in enumerate(self.fields):
            if self.claim:
                pipe.set(self.keys[n + i], job[2], nx=True, get=True, ex=job[3])
            else:
                pipe.set(self.keys[i], job[0], ex=job[1])

    def new_ids(self, records: Sequence[Any]) -> list[int]:
        """Which jobs the records of `fill` (``claim``) found new, by index."""
        return [i for i, before in enumerate(records) if before is None]

    def fill_markers(self, pipe: Any, new: Sequence[int]) -> None:
        """The fallback's second pipeline (``claim``): ``SET NX`` of the new jobs' markers."""
        for i in new:
            pipe.set(self.keys[i], self.fields[i][0], ex=self.fields[i][1], nx=True)

    def read_fallback(self, records: Sequence[Any], wrote: Sequence[Any]) -> str:
        """The fallback's replies (`fill`, `fill_markers`) as the function's answer."""
        if not self.claim:
            return MARKED * len(self.fields)
        out = []
        written = iter(wrote)
        for job, before in zip(self.fields, records, strict=True):
            if before is None:
                out.append(MARKED if next(written) else KEPT)
            else:
                out.append(SAME if _answer(before) == job[2] else CONFLICT)
        return "".join(out)


def mark(tenant: str, headers: Sequence[Header], result_ttl_s: int) -> MarkerWrite:
    """The markers of ``headers`` (jobs of ``tenant`` just pushed), overwriting any."""
    return MarkerWrite(
        [keyspace.submitted(tenant, h.job_id) for h in headers],
        [(h.expires_at_ms, marker_ttl_s(h, result_ttl_s)) for h in headers],
        claim=False,
    )


def claim(tenant: str, jobs: Sequence[tuple[Header, str, int]], result_ttl_s: int) -> MarkerWrite:
    """The gateway's claim of each job id of ``jobs`` (header, envelope hash, record TTL
    in s) and, for the ids new to it, their markers (``NX``: never over a marker that
    is there)."""
    marker_keys, record_keys, fields = [], [], []
    submitted, seen = keyspace.submitted, keyspace.gateway_seen
    for h, digest, ttl in jobs:  # one pass: a gateway batch holds hundreds
        marker_keys.append(submitted(tenant, h.job_id))
        record_keys.append(seen(tenant, h.job_id))
        fields.append((h.expires_at_ms, marker_ttl_s(h, result_ttl_s), digest, ttl))
    return MarkerWrite(marker_keys + record_keys, fields, claim=True)


def _answer(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def write(r: Any, batch: MarkerWrite) -> str:
    """Carry out ``batch`` on a redis-py client: one character per job (see the module)."""
    if len(batch.fields) > CHUNK_JOBS:
        return "".join(write(r, chunk) for chunk in batch.chunks())

    def fallback() -> str:
        pipe = r.pipeline(transaction=False)
        batch.fill(pipe)
        records = pipe.execute()
        new = batch.new_ids(records) if batch.claim else []
        pipe = r.pipeline(transaction=False)
        batch.fill_markers(pipe, new)
        return batch.read_fallback(records, pipe.execute() if new else [])

    return _answer(
        functions.call(r, functions.MARK_QUEUED, batch.keys, batch.args, fallback=fallback)
    )


async def awrite(r: Any, batch: MarkerWrite) -> str:
    """`write` on a ``redis.asyncio`` client."""
    if len(batch.fields) > CHUNK_JOBS:
        return "".join([await awrite(r, chunk) for chunk in batch.chunks()])

    async def fallback() -> str:
        pipe = r.pipeline(transaction=False)
        batch.fill(pipe)
        records = await pipe.execute()
        new = batch.new_ids(records) if batch.claim else []
        pipe = r.pipeline(transaction=False)
        batch.fill_markers(pipe, new)
        return batch.read_fallback(records, await pipe.execute() if new else [])

    return _answer(
        await functions.acall(r, functions.MARK_QUEUED, batch.keys, batch.args, fallback=fallback)
    )
