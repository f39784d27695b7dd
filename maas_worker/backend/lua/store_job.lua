-- One job's result store, written once for store.lua (a job) and
-- store_batch.lua (a batch of jobs).
-- prelude: defines store_job(result, claim, done, payload, sealed, ttl_ms,
--   keep_ms); uses no KEYS or ARGV.
-- store_job() stores the result once, marks the claim done for as long as the
--   request could be replayed, deletes the claim-checked payload and wakes a
--   waiting client; returns 1 stored by this call, 0 a result was already there
--   (the first one is kept unchanged). The done list is popped by clients (a
--   producer's key), so pushing to it is a pcall: nothing a client left there
--   can fail a store.

local function store_job(result, claim, done, payload, sealed, ttl_ms, keep_ms)
  local stored = redis.call('SET', result, sealed, 'NX', 'PX', ttl_ms)
  redis.call('SET', claim, 'done', 'PX', keep_ms)
  redis.call('DEL', payload)
  if stored then
    redis.pcall('RPUSH', done, '1')
    redis.pcall('PEXPIRE', done, ttl_ms)
    return 1
  end
  return 0
end
