-- Close a job that will never run (cancelled before it started): replays of it
-- are recognised, a waiting client wakes up, and it no longer counts as queued
-- in its tenant's (advisory) pending set.
-- KEYS[1] = the job's result
-- KEYS[2] = the job's claim
-- KEYS[3] = the job's done list (wakes a waiting client)
-- KEYS[4] = the job's payload
-- KEYS[5] = the tenant's pending set
-- ARGV[1] = ttl ms of the closed claim and the done list
-- ARGV[2] = job id
-- returns 1 closed, 0 a result is already stored (nothing but the payload and
--   the pending entry removed).

redis.call('DEL', KEYS[4])
redis.pcall('ZREM', KEYS[5], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], 'done', 'PX', ARGV[1])
redis.pcall('RPUSH', KEYS[3], '1')
redis.pcall('PEXPIRE', KEYS[3], ARGV[1])
return 1
