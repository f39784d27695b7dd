"""Replay protection, the job lease, and the write-once result store.

A job's claim key is both the replay cache and a lease:

* absent, no result     -> ``claimed``: this worker runs the job;
* holds a live holder   -> ``busy``: another worker is running it right now;
  the message is retried later rather than dropped, so if that worker dies the
  job is not lost;
* holds ``done``, or a result is stored -> ``replayed``: never run again;
* a job that has already started `DEFAULT_MAX_ATTEMPTS` times, each run ended
  by a dead worker -> ``exhausted``: failed (``worker_lost``), not run again.

Keys are the job's tenant's (keyspace.py): a job is (tenant, job id), so
one tenant's job id can never close or pre-empt another tenant's job.

While a job runs, its holder renews the claim's short TTL (the lease) from a
heartbeat thread. A worker killed mid-job stops renewing; once the lease lapses
the redelivered message finds no claim and no result and runs the job again, so
a crash loses nothing. Each transition is one Lua script, so two workers can
never both win.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from maas_worker.backend import barrier, keyspace, scripts
from maas_worker.backend.cluster import by_slot, is_cluster
from maas_worker.backend.redis import wait_replicated
from maas_worker.protocol import AuditReason, JobState, rejected_marker
from maas_worker.settings import RedisHA

log = logging.getLogger(__name__)


class ClaimOutcome(StrEnum):
    """What the claim script decided for one job (its reply; the module docstring)."""

    #: This process runs the job.
    CLAIMED = "claimed"
    #: Another live worker runs it now: retry the message later.
    BUSY = "busy"
    #: It finished or is closed: never run it again.
    REPLAYED = "replayed"
    #: Claimed, but it already started too often: fail it (``worker_lost``), do not run it.
    EXHAUSTED = "exhausted"
    #: Its tenant asked to cancel it (the request is returned to verify): not claimed.
    CANCELLED = "cancelled"
    #: Over its tenant's rate or in-flight quota: not claimed.
    RATE_LIMITED = "rate_limited"
    #: A command of this job's claim failed (`JobGuard.claim_many` only).
    ERROR = "error"


#: Runs a job may start before it is failed with ``worker_lost`` instead: a
#: job that kills its worker every time must not be redelivered forever.
DEFAULT_MAX_ATTEMPTS = 3
#: How long the attempt count is remembered when the caller gives no window.
DEFAULT_ATTEMPTS_WINDOW_MS = 24 * 3600 * 1000
#: Errors while handling one job (its parse, claim, model or store raised)
#: before it is failed (``internal_error``) instead of retried: a poison job
#: is dead-lettered, never requeued for ever.
DEFAULT_MAX_FAULTS = 3


@dataclass(frozen=True)
class ClaimRequest:
    """One job of `JobGuard.claim_many`: its tenant, id, replay window and quota admission."""

    tenant: str
    job_id: str
    window_ms: int
    admission: tuple[list[str], list[str | float]] | None = None


@dataclass(frozen=True)
class Claim:
    """What `JobGuard.claim_job` decided, with its detail.

    ``cancel_token`` is the (unverified) cancellation request for
    ``cancelled``; ``retry_after_s`` the wait for ``rate_limited`` (None when
    the tenant is over its in-flight cap rather than its rate); ``error`` the
    Redis error of this job's script for ``error`` (`claim_many` only: the
    other jobs of the batch are unaffected).
    """

    outcome: ClaimOutcome
    cancel_token: str | None = None
    retry_after_s: float | None = None
    error: Exception | None = None


def new_holder_id() -> str:
    """A claim holder id unique to this process (host, pid and a random part)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobGuard:
    """Claims, leases and write-once results for one process.

    A job is the pair (tenant, job id), the tenant always the authenticated
    one: every method takes both, and every key is the tenant's (keyspace.py).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        lease_s: int,
        holder: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_faults: int = DEFAULT_MAX_FAULTS,
        ha: RedisHA | None = None,
    ) -> None:
        self._r = client
        #: ``WAIT`` after each result is stored (`RedisHA.wait_command`), or None.
        self._ha = ha or RedisHA()
        self.lease_ms = lease_s * 1000
        self.max_attempts = max_attempts
        self.max_faults = max_faults
        self.holder = holder or new_holder_id()
        # backend/lua/*.lua: each transition is one script (its header: KEYS, ARGV).
        self._claim = scripts.register(client, "claim")
        self._renew = scripts.register(client, "renew")
        self._delete_if = scripts.register(client, "delete_if")
        self._store = scripts.register(client, "store")
        # The batch consumer's: a batch's claims, and its results, in one call each.
        self._claim_batch = scripts.register(client, "claim_batch")
        self._store_batch = scripts.register(client, "store_batch")
        self._reject = scripts.register(client, "reject")
        self._close = scripts.register(client, "close")
        self._fetch = scripts.register(client, "fetch_payload")
        self._fault = scripts.register(client, "fault")
        self._held: set[tuple[str, str]] = set()
        self._held_lock = threading.Lock()

    def claim(
        self, tenant: str, job_id: str, *, window_ms: int = DEFAULT_ATTEMPTS_WINDOW_MS
    ) -> ClaimOutcome:
        """`claim_job` without quotas, returning only the outcome."""
        return self.claim_job(tenant, job_id, window_ms=window_ms).outcome

    def claim_job(
        self,
        tenant: str,
        job_id: str,
        *,
        window_ms: int = DEFAULT_ATTEMPTS_WINDOW_MS,
        admission: tuple[list[str], list[str | float]] | None = None,
        ignore_cancel: bool = False,
    ) -> Claim:
        """Try to take the job (see the module docstring), in one round trip.

        ``exhausted`` means this process now holds the claim, but the job has
        already started `max_attempts` times (each ended by a dead worker): the
        caller must fail it without running it. ``window_ms`` is how long the
        attempt count is kept (the request's remaining lifetime). ``admission``
        (keys and args from `quota`) charges the tenant's quota as the job
        starts; ``cancelled`` returns the cancel request for the caller to
        verify (the job is not claimed). A Redis error raises.
        """
        keys, args = self._claim_call(
            ClaimRequest(tenant, job_id, window_ms, admission), ignore_cancel=ignore_cancel
        )
        pinned = self._pin_replays([tenant])
        claim = self._claimed(tenant, job_id, self._claim(keys=keys, args=args))
        return self._confirm_replays(pinned, [tenant], [claim])[0]

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Claim]:
        """`claim_job` for many jobs in ONE script call (claim_batch.lua).

        Each job is decided as `claim_job` decides it, one after the other in
        the order given (the same job twice: the second copy finds it
        ``busy``). A job whose claim failed (a command of its claim raised, as
        on a quota key of another type) gets outcome ``error`` with a
        `redis.ResponseError`; the others are decided as usual. A lost
        connection raises.

        Every key is passed in KEYS, and the jobs of a batch may be several
        tenants' (several hash slots): on a Redis Cluster the batch is one call
        per slot (`by_slot`), all in one pipeline, and a call refused (or a node
        lost) touches only its own slot's jobs.
        """
        if not requests:
            return []
        groups = by_slot(self._r, [keyspace.tenant_prefix(r.tenant) for r in requests])
        calls = [self._claim_batch_call([requests[n] for n in group]) for group in groups]
        tenants = [r.tenant for r in requests]
        pinned = self._pin_replays(tenants)
        replies = scripts.eval_many(self._r, self._claim_batch, calls)
        claims: list[Claim] = [Claim(ClaimOutcome.ERROR)] * len(requests)
        for group, reply in zip(groups, replies, strict=True):
            for n, claim in zip(group, self._batch_claims(group, requests, reply), strict=True):
                claims[n] = claim
        return self._confirm_replays(pinned, tenants, claims)

    def _pin_replays(self, tenants: Sequence[str]) -> barrier.Pin | None:
        """With ``WAIT`` on a Redis Cluster: where ``tenants``' state is, before a claim."""
        if not self._ha.wait_replicas or not is_cluster(self._r):
            return None
        return barrier.pin(self._r, dict.fromkeys(tenants))

    def _confirm_replays(
        self, pinned: barrier.Pin | None, tenants: Sequence[str], claims: list[Claim]
    ) -> list[Claim]:
        """A job refused as ``replayed`` has its message acknowledged, for good; its result
        (or ``done``) may be one a worker stored but could not confirm on the replicas
        (`NotReplicated`: it handed the job back). On one Redis replication keeps the
        order of writes: no replica can hold the acknowledgement without the result. On
        a Redis Cluster the two are on different nodes: so the result is confirmed
        first (the barrier on its tenant's node), and a job whose result is not is
        ``busy`` instead (retried later, not acknowledged)."""
        replayed = {
            t for t, c in zip(tenants, claims, strict=True) if c.outcome == ClaimOutcome.REPLAYED
        }
        if pinned is None or not replayed:
            return claims
        by_node: dict[str, list[str]] = {}
        for tenant in replayed:
            by_node.setdefault(pinned[tenant], []).append(tenant)
        unconfirmed: set[str] = set()
        for node, on_node in by_node.items():  # one barrier a node
            try:
                barrier.confirm(self._r, {on_node[0]: node}, self._ha, "replayed job")
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("a replayed job's result is not confirmed on the replicas: %s", exc)
                unconfirmed.update(on_node)
        return [
            Claim(ClaimOutcome.BUSY)
            if c.outcome == ClaimOutcome.REPLAYED and t in unconfirmed
            else c
            for t, c in zip(tenants, claims, strict=True)
        ]

    def _batch_claims(
        self, group: list[int], requests: Sequence[ClaimRequest], reply: Any
    ) -> list[Claim]:
        """The claims of the jobs at ``group`` of ``requests`` from one claim_batch.lua reply."""
        if isinstance(reply, Exception):
            # Refused as a whole (before it ran, or a malformed call): each job
            # gets the error, and its fault handling gives back any claim taken.
            return [Claim(ClaimOutcome.ERROR, error=reply) for _ in group]
        claims: list[Claim] = []
        for i, n in enumerate(group):
            req = requests[n]
            outcome, detail = reply[2 * i], reply[2 * i + 1]
            if _text(outcome) == ClaimOutcome.ERROR:
                claims.append(Claim(ClaimOutcome.ERROR, error=redis.ResponseError(_text(detail))))
            else:
                claims.append(self._claimed(req.tenant, req.job_id, (outcome, detail)))
        return claims

    def _claim_batch_call(self, requests: Sequence[ClaimRequest]) -> tuple[list[str], list[Any]]:
        """claim_batch.lua's keys and arguments: 4 keys a job, then each quota's 3 once."""
        keys: list[str] = []
        args: list[Any] = [self.holder, self.lease_ms, self.max_attempts, len(requests)]
        quota_keys: list[str] = []
        # Where each tenant's quota keys start in KEYS (1-based, Lua's), once a tenant.
        quota_at: dict[tuple[str, ...], int] = {}
        first_quota_key = 4 * len(requests) + 1
        for req in requests:
            t, j = req.tenant, req.job_id
            keys += [
                keyspace.claim(t, j),
                keyspace.result(t, j),
                keyspace.attempts(t, j),
                keyspace.cancel(t, j),
            ]
            window = keyspace.clamp_ttl_ms(req.window_ms)
            if req.admission is None:
                args += [window, 0]
                continue
            admit_keys, admit_args = req.admission
            at = quota_at.get(tuple(admit_keys))
            if at is None:
                at = quota_at[tuple(admit_keys)] = first_quota_key + len(quota_keys)
                quota_keys += admit_keys
            args += [window, at, *admit_args]
        return keys + quota_keys, args

    def _claim_call(
        self, req: ClaimRequest, *, ignore_cancel: bool = False
    ) -> tuple[list[str], list[Any]]:
        """The claim script's keys and arguments for one job."""
        t, j = req.tenant, req.job_id
        keys = [
            keyspace.claim(t, j),
            keyspace.result(t, j),
            keyspace.attempts(t, j),
            keyspace.cancel(t, j),
        ]
        args: list[Any] = [
            self.holder,
            self.lease_ms,
            keyspace.clamp_ttl_ms(req.window_ms),
            self.max_attempts,
            "1" if ignore_cancel else "0",
        ]
        if req.admission is not None:
            keys += req.admission[0]
            args += req.admission[1]
        return keys, args

    def _claimed(self, tenant: str, job_id: str, reply: Any) -> Claim:
        raw_outcome, raw_detail = reply
        outcome = ClaimOutcome(_text(raw_outcome))
        detail = _text(raw_detail)
        if outcome in (ClaimOutcome.CLAIMED, ClaimOutcome.EXHAUSTED):
            with self._held_lock:
                self._held.add((tenant, job_id))
        if outcome == ClaimOutcome.CANCELLED:
            return Claim(outcome, cancel_token=detail)
        if outcome == ClaimOutcome.RATE_LIMITED:
            return Claim(outcome, retry_after_s=int(detail) / 1000 if detail else None)
        return Claim(outcome)

    def close(self, tenant: str, job_id: str, *, window_ms: int) -> None:
        """Close a job that will never run (cancelled): replays are recognised as such."""
        self._close(
            keys=[
                keyspace.result(tenant, job_id),
                keyspace.claim(tenant, job_id),
                keyspace.done(tenant, job_id),
                keyspace.payload(tenant, job_id),
                keyspace.pending(tenant),
            ],
            args=[keyspace.clamp_ttl_ms(window_ms), job_id],
        )

    def held(self) -> list[tuple[str, str]]:
        """(tenant, job id) of the jobs this process is running now."""
        with self._held_lock:
            return list(self._held)

    def renew_all(self) -> None:
        """Extend the lease of every job this process holds (heartbeat thread)."""
        for tenant, job_id in self.held():
            self._renew(keys=[keyspace.claim(tenant, job_id)], args=[self.holder, self.lease_ms])

    def release(self, tenant: str, job_id: str) -> None:
        """Give a claim back without a result (the job will be retried)."""
        self._forget(tenant, job_id)
        self._delete_if(keys=[keyspace.claim(tenant, job_id)], args=[self.holder])

    def record_fault(self, tenant: str, job_id: str, *, window_ms: int) -> int:
        """Count one error while handling the job; how many it has had (`max_faults` ends it)."""
        return int(
            self._fault(
                keys=[keyspace.faults(tenant, job_id)], args=[keyspace.clamp_ttl_ms(window_ms)]
            )
        )

    def store_result(
        self, tenant: str, job_id: str, sealed: bytes, *, result_ttl_s: int, replay_window_ms: int
    ) -> bool:
        """Store the sealed result once; False if a result was already stored.

        With ``MAAS_REDIS_WAIT_REPLICAS`` it returns only once that many replicas
        hold the result, and raises `NotReplicated` (a connection error: the job is
        handed back, its message not acknowledged) if they do not in time.
        """
        self._forget(tenant, job_id)
        keys, args = _store_call(tenant, job_id, sealed, replay_window_ms, result_ttl_s)
        if self._ha.wait_command() is None:
            return bool(self._store(keys=keys, args=args))
        reply = self.store_many(
            [(tenant, job_id, sealed, replay_window_ms)], result_ttl_s=result_ttl_s
        )
        if isinstance(reply[0], Exception):
            raise reply[0]
        return reply[0]

    def store_many(
        self, results: Sequence[tuple[str, str, bytes, int]], *, result_ttl_s: int
    ) -> list[bool | Exception]:
        """`store_result` for many ``(tenant, job id, sealed, replay window ms)``, ONE
        script call (store_batch.lua: store.lua's work for each job in turn).

        A job whose store fails gets a `redis.ResponseError` in place (the
        others are stored); a lost connection raises, and so does
        `NotReplicated` (``WAIT``, as in `store_result`: in the same pipeline,
        after the stores). On a Redis Cluster, one call per hash slot (as in
        `claim_many`), and ``WAIT`` by the durability barrier (backend/barrier.py) on
        each node the stores went to.
        """
        if not results:
            return []
        with self._held_lock:  # once for the batch: the lease thread takes it too
            self._held.difference_update((tenant, job_id) for tenant, job_id, _, _ in results)
        groups = by_slot(self._r, [keyspace.tenant_prefix(tenant) for tenant, *_ in results])
        calls: list[tuple[list[str], list[Any]]] = []
        for group in groups:
            keys: list[str] = []
            args: list[Any] = [keyspace.clamp_ttl_ms(result_ttl_s * 1000)]
            for n in group:
                tenant, job_id, sealed, window = results[n]
                job_keys, (_, _, keep_ms) = _store_call(
                    tenant, job_id, sealed, window, result_ttl_s
                )
                keys += job_keys
                args += [sealed, keep_ms]
            calls.append((keys, args))
        wait = self._ha.wait_command()
        what = f"{len(results)} result(s) stored"
        if wait is not None and is_cluster(self._r):
            # The stores go over one connection per primary: a WAIT after them would
            # vouch for none of it. The barrier, on each node they touched, does.
            pinned = barrier.pin(self._r, dict.fromkeys(t for t, *_ in results))
            replies = scripts.eval_many(self._r, self._store_batch, calls)
            barrier.confirm(self._r, pinned, self._ha, what)
        else:
            replies = scripts.eval_many(self._r, self._store_batch, calls, then=wait)
            if wait is not None:
                wait_replicated(replies.pop(), self._ha, what)
        stored: list[bool | Exception] = [False] * len(results)
        for group, reply in zip(groups, replies, strict=True):
            for i, n in enumerate(group):
                if isinstance(reply, Exception):
                    stored[n] = reply
                else:
                    r = reply[i]
                    stored[n] = bool(r) if isinstance(r, int) else redis.ResponseError(_text(r))
        return stored

    def fetch_payloads(
        self, jobs: Sequence[tuple[str, str]], max_bytes: int
    ) -> list[bytes | int | None]:
        """`fetch_payload` for many (tenant, job id) in ONE round trip."""
        replies = scripts.eval_many(
            self._r, self._fetch, [([keyspace.payload(t, j)], [max_bytes]) for t, j in jobs]
        )
        return [-1 if r == -1 else r if isinstance(r, bytes) and r else None for r in replies]

    def fetch_payload(self, tenant: str, job_id: str, max_bytes: int) -> bytes | int | None:
        """The job's claim-checked request; None if absent, -1 if over ``max_bytes``."""
        data = self._fetch(keys=[keyspace.payload(tenant, job_id)], args=[max_bytes])
        if data == -1:
            return -1
        return data if isinstance(data, bytes) and data else None

    def mark_rejected(
        self,
        tenant: str,
        job_id: str,
        *,
        ttl_s: int,
        state: JobState = JobState.REJECTED,
        reason: AuditReason | None = None,
    ) -> None:
        """Record that an authenticated message of this job was refused (never over a result).

        ``state`` is what the client's status shows: ``rejected`` or ``expired``;
        ``reason`` (for ``rejected``) is the audit reason its client learns: the
        refused message was the tenant's own, so the word tells it nothing of
        anyone else (`protocol.rejected_marker`). Only for authenticated
        refusals: a message that did not authenticate never changes a job's
        state (`mark_suspect`).
        """
        self._forget(tenant, job_id)
        t, j = tenant, job_id
        self._reject(
            keys=[
                keyspace.result(t, j),
                keyspace.rejected(t, j),
                keyspace.done(t, j),
                keyspace.claim(t, j),
                keyspace.payload(t, j),
                keyspace.pending(t),
            ],
            args=[
                keyspace.clamp_ttl_ms(ttl_s * 1000),
                self.holder,
                rejected_marker(state, reason),
                j,
            ],
        )

    def drop_cancel(self, tenant: str, job_id: str, token: str | bytes) -> None:
        """Delete the job's cancel request if it still is ``token`` (a refused one)."""
        self._delete_if(keys=[keyspace.cancel(tenant, job_id)], args=[token])

    def mark_suspect(self, tenant: str, job_id: str, *, ttl_s: int) -> None:
        """Note that a message naming this job failed authentication (state unchanged)."""
        self._r.set(keyspace.suspect(tenant, job_id), "1", px=keyspace.clamp_ttl_ms(ttl_s * 1000))

    def _forget(self, tenant: str, job_id: str) -> None:
        with self._held_lock:
            self._held.discard((tenant, job_id))


def _store_call(
    tenant: str, job_id: str, sealed: bytes, replay_window_ms: int, result_ttl_s: int
) -> tuple[list[str], list[Any]]:
    """The store script's keys and arguments for one result."""
    keep_ms = keyspace.clamp_ttl_ms(max(replay_window_ms, result_ttl_s * 1000))
    t, j = tenant, job_id
    return (
        [keyspace.result(t, j), keyspace.claim(t, j), keyspace.done(t, j), keyspace.payload(t, j)],
        [sealed, keyspace.clamp_ttl_ms(result_ttl_s * 1000), keep_ms],
    )


def _text(value: bytes | str | int | None) -> str:
    if isinstance(value, bytes):
        # The cancel request comes back as the detail: whatever a Redis writer
        # stored there, it must fail verification, not the decoding.
        return value.decode(errors="replace")
    return "" if value is None else str(value)


class LeaseKeeper:
    """Daemon thread renewing this process's leases every third of the lease."""

    def __init__(self, guard: JobGuard) -> None:
        self._guard = guard
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maas-lease", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (leases then lapse on their own)."""
        self._stop.set()

    def _run(self) -> None:
        interval = self._guard.lease_ms / 3000
        while not self._stop.wait(interval):
            try:
                self._guard.renew_all()
            except redis.RedisError:
                log.warning("lease renewal failed; retrying", exc_info=False)
