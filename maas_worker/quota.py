"""Tenant quotas: a token bucket (rate with burst) and a cap on jobs in flight.

Each job is charged once, by whichever side admits it first: the client at
submit (fast feedback: `RateLimited` with a retry-after) or, if a client
skipped that, the worker at execution start (authoritative: the job is
refused as ``rate_limited``). The admission marker keyed by job id makes the
second check free and keeps a redelivered job from being charged twice.

Everything runs inside one Lua script per admission, on Redis's own clock
(``TIME``), so concurrent clients and workers on hosts with different clocks
share one consistent bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from . import keyspace
from .keys import TenantPolicy

#: Lua function shared by the client's admission script and the worker's claim
#: script. Returns {1, 0} admitted, {0, wait_ms} over the rate, {-1, 0} over
#: the in-flight cap.
ADMIT_FUNCTION = """
local function admit(bucket, inflight, marker, job, rate, burst, maxf, exp_ms)
  if redis.call('EXISTS', marker) == 1 then return {1, 0} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if maxf > 0 then
    redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
    if redis.call('ZCARD', inflight) >= maxf then return {-1, 0} end
  end
  if rate > 0 then
    local b = redis.call('HMGET', bucket, 'tokens', 'ts')
    local tokens = tonumber(b[1]) or burst
    local ts = tonumber(b[2]) or now
    if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end
    if tokens < 1 then return {0, math.ceil((1 - tokens) * 1000 / rate)} end
    redis.call('HSET', bucket, 'tokens', tostring(tokens - 1), 'ts', tostring(now))
    redis.call('PEXPIRE', bucket, math.ceil(burst * 1000 / rate) + 1000)
  end
  -- Lua numbers are doubles printed with 14 digits: keep TTLs small integers.
  local keep = math.min(math.max(exp_ms - now, 0), 691200000) + 1000
  if maxf > 0 then
    redis.call('ZADD', inflight, exp_ms, job)
    if redis.call('PTTL', inflight) < keep then redis.call('PEXPIRE', inflight, keep) end
  end
  redis.call('SET', marker, '1', 'PX', keep)
  return {1, 0}
end
"""

_ADMIT = ADMIT_FUNCTION + """
return admit(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
             tonumber(ARGV[4]), tonumber(ARGV[5]))
"""


# All or nothing for a batch of jobs (Client.submit_many): KEYS bucket,
# in-flight set, then one admission marker per job; ARGV rate, burst, max in
# flight, expiry ms, then the job ids. Same replies as `admit`.
_ADMIT_MANY = """
local rate, burst, maxf, exp_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                                  tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local todo = {}
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then table.insert(todo, i) end
end
local n = #todo
if n == 0 then return {1, 0} end
if maxf > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) + n > maxf then return {-1, 0} end
end
local tokens = 0
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end
  if n > burst then return {0, -1} end
  if tokens < n then return {0, math.ceil((n - tokens) * 1000 / rate)} end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - n), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
end
local keep = math.min(math.max(exp_ms - now, 0), 691200000) + 1000
for _, i in ipairs(todo) do
  if maxf > 0 then redis.call('ZADD', KEYS[2], exp_ms, ARGV[i + 2]) end
  redis.call('SET', KEYS[i], '1', 'PX', keep)
end
if maxf > 0 and redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
return {1, 0}
"""


@dataclass(frozen=True)
class Verdict:
    """The outcome of an admission: admitted, or why not and when to retry."""

    admitted: bool
    retry_after_s: float | None = None
    over: str | None = None  # "rate" or "in_flight"


def admission_keys(tenant: str, job_id: str) -> list[str]:
    """KEYS for `ADMIT_FUNCTION`: bucket, in-flight set, admission marker."""
    return [keyspace.bucket(tenant), keyspace.in_flight(tenant), keyspace.admitted(job_id)]


def admission_args(job_id: str, policy: TenantPolicy, expires_at_ms: int) -> list[str | float]:
    """ARGV for `ADMIT_FUNCTION`: job, rate, burst, max in flight, expiry."""
    return [job_id, policy.rate_per_s, policy.effective_burst, policy.max_in_flight,
            expires_at_ms]


def verdict(code: int, wait_ms: int) -> Verdict:
    """Turn the script's reply into a `Verdict`."""
    if code == 1:
        return Verdict(True)
    if code == 0:
        # wait_ms < 0: the batch is larger than the burst, so it can never pass.
        return Verdict(False, wait_ms / 1000 if wait_ms >= 0 else None, "rate")
    return Verdict(False, None, "in_flight")


class Quotas:
    """Admit jobs against their tenant's quota and release them when done."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._admit = client.register_script(_ADMIT)
        self._admit_many = client.register_script(_ADMIT_MANY)

    def admit(self, tenant: str, job_id: str, policy: TenantPolicy,
              expires_at_ms: int) -> Verdict:
        """Charge the job once; a tenant without quotas is admitted without a round trip."""
        if not policy.limited:
            return Verdict(True)
        code, wait_ms = self._admit(keys=admission_keys(tenant, job_id),
                                    args=admission_args(job_id, policy, expires_at_ms))
        return verdict(int(code), int(wait_ms))

    def admit_many(self, tenant: str, job_ids: list[str], policy: TenantPolicy,
                   expires_at_ms: int) -> Verdict:
        """Charge a batch all at once, or none of it."""
        if not policy.limited or not job_ids:
            return Verdict(True)
        code, wait_ms = self._admit_many(
            keys=[keyspace.bucket(tenant), keyspace.in_flight(tenant),
                  *(keyspace.admitted(j) for j in job_ids)],
            args=[policy.rate_per_s, policy.effective_burst, policy.max_in_flight,
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
