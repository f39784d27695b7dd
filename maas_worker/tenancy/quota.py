"""Tenant quotas: a token bucket (rate with burst) and a cap on jobs in flight.

The authority is the worker: a job is charged as a worker starts it, inside
the claim script (guard.py), against a bucket and an in-flight set that only
workers write. A job over the rate or the cap is refused ``rate_limited``.
There is no "already charged" marker a producer could set: a job is charged
every time a worker starts it (once, unless its worker died and it runs
again), and a copy that finds the job busy elsewhere is not charged.

A client checks first, for fast feedback (`RateLimited` with a retry-after),
but that check is advisory and writes only the tenant's ``pending`` set: the
jobs it has queued and no worker has started yet. Counting them keeps an
honest client from queueing more than its quota lets workers start; a client
that skips the check gains nothing, its extra jobs are refused by workers.

Everything runs inside one Lua script per call, on Redis's own clock
(``TIME``), so concurrent clients and workers on hosts with different clocks
share one consistent bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from maas_worker.backend import functions, keyspace
from maas_worker.tenancy.keyring import TenantPolicy

# Lua helpers of both quota scripts: Redis's own clock, the bucket's tokens now
# (refilled at ``rate`` a second up to ``burst``), the wait for ``need`` more
# tokens, and how long a tenant's sets live. Lua numbers are doubles printed
# with 14 digits: keep waits and TTLs small integers.
_QUOTA_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function tokens_at(bucket, rate, burst, now)
  local b = redis.call('HMGET', bucket, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end
  return tokens
end
local function wait_ms(need, rate)
  return math.min(math.ceil(need * 1000 / rate), 86400000)
end
local function keep_ms(exp_ms, now)
  return math.min(math.max(exp_ms - now, 0), 691200000) + 1000
end
"""

#: Lua function of the worker's claim script. Charges one start of ``job``:
#: {1, 0} admitted, {0, wait_ms} over the rate, {-1, 0} over the in-flight cap.
#: A job already in the in-flight set (restarted) does not count twice there.
ADMIT_FUNCTION = _QUOTA_HELPERS + """
local function admit(bucket, inflight, pending, job, rate, burst, maxf, exp_ms)
  local now = now_ms()
  if maxf > 0 then
    redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
    if not redis.call('ZSCORE', inflight, job)
        and redis.call('ZCARD', inflight) >= maxf then return {-1, 0} end
  end
  if rate > 0 then
    local tokens = tokens_at(bucket, rate, burst, now)
    if tokens < 1 then return {0, wait_ms(1 - tokens, rate)} end
    redis.call('HSET', bucket, 'tokens', tostring(tokens - 1), 'ts', tostring(now))
    redis.call('PEXPIRE', bucket, math.ceil(burst * 1000 / rate) + 1000)
  end
  if maxf > 0 then
    local keep = keep_ms(exp_ms, now)
    redis.call('ZADD', inflight, exp_ms, job)
    if redis.call('PTTL', inflight) < keep then redis.call('PEXPIRE', inflight, keep) end
  end
  -- pcall: the pending set is the producers' (advisory); whatever they left
  -- there must not fail a charge already made.
  redis.pcall('ZREM', pending, job)
  return {1, 0}
end
"""

# The client's advisory check for a batch of jobs (Client.submit_many), all or
# nothing: KEYS bucket, in-flight set, pending set; ARGV rate, burst, max in
# flight, expiry ms, then the job ids. Reads the bucket without charging it;
# counts the tenant's jobs already queued (pending) as spent; records the
# batch as pending. Same replies as `admit` ({0, -1}: larger than the burst).
# The in-flight set is the workers' (a producer's Redis user may not write
# it, docs/security.md "Redis roles"): expired entries are pruned only where
# the caller may (no ACL, workers, the operator), and only the live ones
# (score = expiry, later than now) are counted either way. Run as a Redis
# function (functions.py), not EVAL.
_ADVISE_MANY = _QUOTA_HELPERS + """
local rate, burst, maxf, exp_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                                  tonumber(ARGV[4])
local n = #ARGV - 4
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local queued = redis.call('ZCARD', KEYS[3])
if maxf > 0 then
  if not redis.acl_check_cmd or redis.acl_check_cmd('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  end
  if redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf') + queued + n > maxf then return {-1, 0} end
end
if rate > 0 then
  if n > burst then return {0, -1} end
  local free = tokens_at(KEYS[1], rate, burst, now) - queued
  if free < n then return {0, wait_ms(n - free, rate)} end
end
for i = 5, #ARGV do redis.call('ZADD', KEYS[3], exp_ms, ARGV[i]) end
local keep = keep_ms(exp_ms, now)
if redis.call('PTTL', KEYS[3]) < keep then redis.call('PEXPIRE', KEYS[3], keep) end
return {1, 0}
"""


@dataclass(frozen=True)
class Verdict:
    """The outcome of an admission: admitted, or why not and when to retry."""

    admitted: bool
    retry_after_s: float | None = None
    over: str | None = None  # "rate" or "in_flight"


def admission_keys(tenant: str) -> list[str]:
    """KEYS for `ADMIT_FUNCTION`: the tenant's bucket, in-flight set and pending set."""
    return [keyspace.bucket(tenant), keyspace.in_flight(tenant), keyspace.pending(tenant)]


def admission_args(job_id: str, policy: TenantPolicy, expires_at_ms: int) -> list[str | float]:
    """ARGV for `ADMIT_FUNCTION`: job, rate, burst, max in flight, expiry."""
    return [job_id, policy.rate_per_s, policy.effective_burst, policy.max_in_flight,
            expires_at_ms]


def verdict(code: int, wait_ms: int) -> Verdict:
    """Turn a script's reply into a `Verdict`."""
    if code == 1:
        return Verdict(True)
    if code == 0:
        # wait_ms < 0: the batch is larger than the burst, so it can never pass.
        return Verdict(False, wait_ms / 1000 if wait_ms >= 0 else None, "rate")
    return Verdict(False, None, "in_flight")


class Quotas:
    """The client's advisory quota check, and the worker's release of a finished job."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def advise_many(self, tenant: str, job_ids: list[str], policy: TenantPolicy,
                    expires_at_ms: int) -> Verdict:
        """Whether workers will start this batch now (all or none); records it as pending.

        Advisory: nothing is charged here (workers charge each job as they
        start it); a tenant without quotas needs no round trip.
        """
        if not policy.limited or not job_ids:
            return Verdict(True)
        code, wait_ms = functions.call(
            self._r, functions.ADVISE_MANY, admission_keys(tenant),
            [policy.rate_per_s, policy.effective_burst, policy.max_in_flight,
             expires_at_ms, *job_ids])
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
