-- The client's advisory quota check for a batch of jobs (Client.submit_many),
-- all or nothing. Reads the bucket without charging it; counts the tenant's
-- jobs already queued (pending) as spent; records the batch as pending.
-- The in-flight set is the workers' (a producer's Redis user may not write
-- it, docs/security.md "Redis roles"): expired entries are pruned only where
-- the caller may (no ACL, workers, the operator), and only the live ones
-- (score = expiry, later than now) are counted either way.
-- Run as the library function maas_v2_advise_many (functions.py;
-- docs/envelope.md 3.5), not EVAL.
-- uses: bucket
-- KEYS[1] = the tenant's token bucket
-- KEYS[2] = the tenant's in-flight set
-- KEYS[3] = the tenant's pending set
-- ARGV[1] = rate per s
-- ARGV[2] = burst
-- ARGV[3] = max in flight
-- ARGV[4] = the jobs' expiry ms
-- ARGV[5..] = the batch's job ids
-- returns {1, 0} admitted (the ids added to pending), {0, wait ms} over the
--   rate ({0, -1}: larger than the burst), {-1, 0} over the in-flight cap.

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
