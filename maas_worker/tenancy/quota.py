"""Tenant quotas: a token bucket (rate with burst) and a cap on jobs in flight.

The authority is the worker: a job is charged as a worker starts it, inside the
claim script (backend/lua/claim_job.lua, in claim.lua and claim_batch.lua),
against a bucket and an in-flight set that only workers write. A job over the
rate or the cap is refused ``rate_limited``. There is no "already charged"
marker a producer could set: a job is charged every time a worker starts it
(once, unless its worker died and it runs again), and a copy that finds the job
busy elsewhere is not charged.

A client checks first, for fast feedback (`RateLimited` with a retry-after),
but that check is advisory and writes only the tenant's ``pending`` set: the
jobs it has queued and no worker has started yet. Counting them keeps an
honest client from queueing more than its quota lets workers start; a client
that skips the check gains nothing, its extra jobs are refused by workers.

Everything runs inside one Lua script per call, on Redis's own clock
(``TIME``), so concurrent clients and workers on hosts with different clocks
share one consistent bucket. The bucket is written once, in
``backend/lua/bucket.lua``, a prelude of both scripts (`backend.scripts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from maas_worker.backend import functions, keyspace
from maas_worker.tenancy.keyring import TenantPolicy


@dataclass(frozen=True)
class Verdict:
    """The outcome of an admission: admitted, or why not and when to retry."""

    admitted: bool
    retry_after_s: float | None = None
    over: str | None = None  # "rate" or "in_flight"


def admission_keys(tenant: str) -> list[str]:
    """KEYS of ``admit()`` (admit.lua): the tenant's bucket, in-flight set and pending set."""
    return [keyspace.bucket(tenant), keyspace.in_flight(tenant), keyspace.pending(tenant)]


def admission_args(job_id: str, policy: TenantPolicy, expires_at_ms: int) -> list[str | float]:
    """ARGV of ``admit()`` (admit.lua): job, rate, burst, max in flight, expiry."""
    return [job_id, policy.rate_per_s, policy.effective_burst, policy.max_in_flight, expires_at_ms]


def verdict(code: int, wait_ms: int) -> Verdict:
    """Turn a script's reply into a `Verdict`."""
    if code == 1:
        return Verdict(True)
    if code == 0:
        # wait_ms < 0: the batch is larger than the burst, so it can never pass.
        return Verdict(False, wait_ms / 1000 if wait_ms >= 0 else None, "rate")
    return Verdict(False, None, "in_flight")


def advise_call(
    tenant: str, job_ids: list[str], policy: TenantPolicy, expires_at_ms: int
) -> tuple[str, list[str], list[str | float]] | None:
    """The advisory check of a batch as (library function, keys, args) for ``FCALL``, or
    None when there is nothing to ask (no quota, no job). Sync and async clients send it."""
    if not policy.limited or not job_ids:
        return None
    args: list[str | float] = [
        policy.rate_per_s,
        policy.effective_burst,
        policy.max_in_flight,
        expires_at_ms,
        *job_ids,
    ]
    return functions.ADVISE_MANY, admission_keys(tenant), args


class Quotas:
    """The client's advisory quota check, and the worker's release of a finished job."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def advise_many(
        self, tenant: str, job_ids: list[str], policy: TenantPolicy, expires_at_ms: int
    ) -> Verdict:
        """Whether workers will start this batch now (all or none); records it as pending.

        Advisory: nothing is charged here (workers charge each job as they
        start it); a tenant without quotas needs no round trip.
        """
        call = advise_call(tenant, job_ids, policy, expires_at_ms)
        if call is None:
            return Verdict(True)
        code, wait_ms = functions.call(self._r, *call)
        return verdict(int(code), int(wait_ms))

    def release(self, tenant: str, job_id: str, policy: TenantPolicy) -> None:
        """The job ended: it no longer counts against ``max_in_flight``."""
        if policy.max_in_flight:
            self._r.zrem(keyspace.in_flight(tenant), job_id)

    def release_many(self, jobs: list[tuple[str, str]]) -> None:
        """`release` for many ``(tenant, job id)`` of in-flight-capped tenants, one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for tenant, job_id in jobs:
            pipe.zrem(keyspace.in_flight(tenant), job_id)
        pipe.execute()
