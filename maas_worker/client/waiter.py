"""Waking many awaiting jobs from one event loop: a task per batch of jobs, not per job.

A worker ends every job the same way: it writes the outcome (the sealed
result, or the rejected marker, or the cancel request) and pushes one
element to the job's ``done`` list (backend/lua/store.lua, reject.lua,
close.lua, cancel.lua). The sync `Job.result` blocks on that one list. The
`Waiter` of an `AsyncClient` does the same for many jobs at once
(docs/async.md):

* **reads in batches**: jobs whose outcome may have changed (newly awaited,
  or woken) are read together, the four keys of each (`jobcore.wait_keys`)
  in one ``MGET``: one command and one round trip for the whole batch (all
  of a tenant's keys share its hash tag: one Redis Cluster slot);
* **lanes**: the jobs still pending after that read are split into lanes of
  `LANE_KEYS` (more per lane beyond `MAX_LANES` lanes); each lane is one task
  on one connection blocked in one ``BLPOP`` over its jobs' ``done`` lists,
  newest first. A push wakes the lane, which hands that job and the lane's
  jobs awaited before it (most likely ended too: queues are first in, first
  out) to the next read, in one ``MGET``;
* **recheck**: a lane whose ``BLPOP`` times out (`RECHECK_S`) hands all its
  jobs to a read: another waiter (a second client of the same job) may have
  taken the element meant for us. That is the only polling, once per
  `RECHECK_S` per lane's jobs, and only for jobs that take that long.

No thread, and no task or connection per job: 10,000 jobs awaited together
cost 32 lane tasks and connections (`MAX_LANES`; lanes of 313 keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from maas_worker.backend import keyspace
from maas_worker.backend.cluster import amget_many
from maas_worker.client.jobcore import JobCore, wait_keys

log = logging.getLogger(__name__)

#: ``done`` lists one lane blocks on in one ``BLPOP`` (more once there are `MAX_LANES`).
LANE_KEYS = 256
#: Lanes (connections blocked in ``BLPOP``) of one client at a time, about.
MAX_LANES = 32
#: A lane that saw no push for this long re-reads its jobs (a wake-up taken by another
#: waiter of the same job); shorter than the connections' socket timeout.
RECHECK_S = 5.0

#: The outcome of a wait: the model's output, or the error `Job.result` raises.
Outcome = dict[str, Any] | BaseException


class Waiter:
    """Wakes the awaiters of one client's jobs (one per `AsyncClient`).

    ``redis`` is the client's ``redis.asyncio`` backend client; ``fail`` turns a
    connection error into the error awaiters see.
    """

    def __init__(self, redis: Any, fail: Callable[[BaseException], BaseException]) -> None:
        self._r = redis
        self._fail = fail
        self._jobs: dict[str, JobCore] = {}
        self._futures: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._to_read: set[str] = set()
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._lanes: set[asyncio.Task[None]] = set()
        #: Jobs some lane blocks on (a read starts no second lane for them).
        self._laned: set[str] = set()
        #: Lanes waiting for the next read to finish (`_lane`).
        self._read_waiters: list[asyncio.Future[None]] = []
        #: Redis round trips made (reads and BLPOPs), for the tests and the benchmark.
        self.round_trips = 0

    def watch(self, job: JobCore) -> asyncio.Future[Outcome]:
        """A future that resolves with the job's outcome (never raises: the outcome may
        be an error); cancelling it stops watching the job for that awaiter only."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        futures = self._futures.setdefault(job.id, [])
        if not futures:
            self._jobs[job.id] = job
            self._to_read.add(job.id)
            self._wake.set()
        futures.append(fut)
        fut.add_done_callback(functools.partial(self._forget, job.id))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        return fut

    def _forget(self, job_id: str, fut: asyncio.Future[Outcome]) -> None:
        futures = self._futures.get(job_id)
        if futures is not None and fut in futures:
            futures.remove(fut)
            if not futures:
                del self._futures[job_id]
                self._jobs.pop(job_id, None)
                self._to_read.discard(job_id)

    def _resolve(self, job_id: str, outcome: Outcome) -> None:
        for fut in list(self._futures.get(job_id, ())):
            if not fut.done():
                fut.set_result(outcome)

    # -- reading --------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while self._futures:
                await self._wake.wait()
                self._wake.clear()
                waiters, self._read_waiters = self._read_waiters, []
                batch = [j for j in self._to_read if j in self._jobs]
                self._to_read.clear()
                if batch:
                    await self._read(batch)
                _release(waiters)
        finally:
            _release(self._read_waiters)
            self._read_waiters = []

    async def _read(self, batch: list[str]) -> None:
        keys = [k for job_id in batch for k in wait_keys(self._jobs[job_id].tenant, job_id)]
        self.round_trips += 1
        try:
            replies = await amget_many(self._r, keys)
        except Exception as exc:  # Redis errors: every job of the batch hears of it
            for job_id in batch:
                self._resolve(job_id, self._fail(exc))
            return
        pending = []
        for n, job_id in enumerate(batch):
            job = self._jobs.get(job_id)
            if job is None:
                continue  # no one waits any more
            try:
                output, _ = job.outcome(replies[4 * n : 4 * n + 4])
            except Exception as exc:  # the job's error (or a bug): its awaiters hear it
                self._resolve(job_id, exc)
                continue
            if output is not None:
                self._resolve(job_id, output)
            elif job_id not in self._laned:
                pending.append(job_id)
        # Lanes are connections: at most MAX_LANES at a time (redis-py's pools hold 100
        # connections), so beyond that many jobs a lane blocks on more keys.
        room = max(1, MAX_LANES - len(self._lanes))
        size = max(LANE_KEYS, -(-len(pending) // room))
        for start in range(0, len(pending), size):
            lane = asyncio.get_running_loop().create_task(self._lane(pending[start : start + size]))
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)

    # -- lanes -----------------------------------------------------------------------------
    async def _lane(self, members: list[str]) -> None:
        """Block on the ``done`` lists of ``members`` until each is handed to a read.

        ``members`` are in the order they were awaited (for `as_completed` over a
        submit, the order of submission), and a tenant's jobs are taken first in,
        first out: when one of them ends, those awaited before it have most likely
        ended too (a batch consumer ends 64 at a time). So the ``BLPOP`` names the
        lists newest first: the list it pops is the newest job that ended, and that
        job and every member before it go to the next read together, one wake and
        one ``MGET`` per batch of jobs ended, not per job. The lane waits for that
        read (so it does not wake again on the lists of jobs just read), then
        blocks on the members still pending: those read too early stay in it.
        """
        left = dict.fromkeys(members)
        self._laned.update(members)
        try:
            while True:
                keys = {keyspace.done(self._jobs[j].tenant, j): j for j in left if j in self._jobs}
                if not keys:
                    return
                self.round_trips += 1
                try:
                    popped = await self._r.blpop(list(reversed(keys)), timeout=RECHECK_S)
                except Exception as exc:
                    for job_id in keys.values():
                        self._resolve(job_id, self._fail(exc))
                    return
                order = list(keys.values())
                if popped is None:
                    # Recheck: a wake-up may have been taken. The read starts new
                    # lanes for the jobs still pending (not laned once this returns).
                    self._to_read.update(order)
                    self._wake.set()
                    return
                key = popped[0].decode() if isinstance(popped[0], bytes) else popped[0]
                woken = order[: order.index(keys[key]) + 1] if key in keys else []
                woken = [j for j in woken if j in self._jobs]  # still awaited
                if not woken or self._reader is None or self._reader.done():
                    continue  # nothing to read, or no reader (no one awaits): re-check
                read: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._read_waiters.append(read)
                self._to_read.update(woken)
                self._wake.set()
                await read
        finally:
            self._laned.difference_update(left)

    async def close(self) -> None:
        """Stop the reader and the lanes (awaiters are cancelled)."""
        for fut in [f for fs in self._futures.values() for f in fs]:
            fut.cancel()
        tasks = [t for t in (self._reader, *self._lanes) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _release(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)
