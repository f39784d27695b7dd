-- Cancel a job of the client's own tenant: never after a result or a refusal;
-- never for a job the tenant does not have (a foreign or unknown id writes
-- nothing); the newest request stands (a stale or planted value cannot block
-- the owner's); wake waiting clients; a job not started no longer counts as
-- queued in the tenant's advisory pending set.
-- Run as the library function maas_v2_cancel (functions.py; docs/envelope.md
-- 3.5), not EVAL: a producer's Redis user may call the library's functions but
-- not send Lua of its own.
-- KEYS[1] = the job's result
-- KEYS[2] = the job's cancel request
-- KEYS[3] = the job's done list
-- KEYS[4] = the job's submitted marker (its expiry ms)
-- KEYS[5] = the job's rejected marker
-- KEYS[6] = the job's claim
-- KEYS[7] = the tenant's pending set
-- ARGV[1] = cancel token
-- ARGV[2] = default ttl ms (when the submitted marker is gone)
-- ARGV[3] = result ttl ms
-- ARGV[4] = job id
-- ARGV[5] = longest ttl ms
-- returns 1 requested, 0 already finished, -1 no such job of this tenant.

if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local sub = redis.call('GET', KEYS[4])
if not sub and redis.call('EXISTS', KEYS[6]) == 0 then return -1 end
local ttl = tonumber(ARGV[2])
local exp = tonumber(sub or '')
if exp then
  local t = redis.call('TIME')
  ttl = math.min(math.max(exp - (tonumber(t[1]) * 1000), 0) + tonumber(ARGV[3]),
                 tonumber(ARGV[5]))
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', math.max(ttl, 1))
redis.call('RPUSH', KEYS[3], '1')
redis.call('PEXPIRE', KEYS[3], math.max(ttl, 1))
if redis.call('EXISTS', KEYS[6]) == 0 then redis.pcall('ZREM', KEYS[7], ARGV[4]) end
return 1
