-- An authenticated rejection: never over a stored result, nor over a job another
-- live holder is running (that run decides the outcome: a stale copy must not
-- make its client give up). The claim is closed, so the job cannot run later,
-- and the job leaves the tenant's pending set. The done list is pushed with a
-- pcall (a producer's key: nothing a client left there can fail a refusal).
-- KEYS[1] = the job's result
-- KEYS[2] = the job's rejected marker
-- KEYS[3] = the job's done list
-- KEYS[4] = the job's claim
-- KEYS[5] = the job's payload
-- KEYS[6] = the tenant's pending set
-- ARGV[1] = ttl ms
-- ARGV[2] = this worker's holder id
-- ARGV[3] = the marker a client reads: 'expired', 'rejected' or 'rejected:<reason>'
-- ARGV[4] = job id
-- returns 1 recorded, 0 not (a result is stored, or another holder runs it).

if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local cur = redis.pcall('GET', KEYS[4])
if type(cur) == 'string' and cur ~= 'done' and cur ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[1])
redis.pcall('RPUSH', KEYS[3], '1')
redis.pcall('PEXPIRE', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], 'done', 'PX', ARGV[1])
redis.call('DEL', KEYS[5])
redis.pcall('ZREM', KEYS[6], ARGV[4])
return 1
