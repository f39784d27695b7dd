-- Count one fault of a job (an error while handling it).
-- KEYS[1] = the job's fault count
-- ARGV[1] = ttl ms of the count
-- returns the count so far.

local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
