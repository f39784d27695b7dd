-- The worker's admission: charge one start of a job against its tenant's
-- quota, inside a job's claim (claim_job.lua: claim.lua, claim_batch.lua).
-- prelude: defines admit(bucket, inflight, pending, job, rate, burst, maxf,
--   exp_ms); uses no KEYS or ARGV.
-- uses: bucket
-- admit() returns {1, 0} admitted, {0, wait ms} over the rate, {-1, 0} over
--   the in-flight cap. A job already in the in-flight set (restarted) does
--   not count twice there. The arguments: the tenant's bucket, in-flight set
--   and pending set keys (quota.admission_keys), then the job id, rate per s,
--   burst, max in flight and the job's expiry ms (quota.admission_args).

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
