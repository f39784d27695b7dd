-- Store a result once; mark the claim done for as long as the request could be
-- replayed; wake a waiting client. The done list is popped by clients (a
-- producer's key), so pushing to it is a pcall: nothing a client left there
-- can fail a store.
-- KEYS[1] = the job's result
-- KEYS[2] = the job's claim
-- KEYS[3] = the job's done list
-- KEYS[4] = the job's payload
-- ARGV[1] = the sealed result
-- ARGV[2] = result ttl ms
-- ARGV[3] = how long the claim stays 'done' (ms: replay window or result ttl)
-- returns 1 stored by this call, 0 a result was already there (the first one
--   is kept unchanged).

local stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
redis.call('SET', KEYS[2], 'done', 'PX', ARGV[3])
redis.call('DEL', KEYS[4])
if stored then
  redis.pcall('RPUSH', KEYS[3], '1')
  redis.pcall('PEXPIRE', KEYS[3], ARGV[2])
  return 1
end
return 0
