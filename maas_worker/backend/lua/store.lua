-- Store a result once; mark the claim done for as long as the request could be
-- replayed; wake a waiting client (claims.JobGuard.store_result). The body is
-- store_job.lua's (store_batch.lua runs the same for a batch).
-- uses: store_job
-- KEYS[1] = the job's result
-- KEYS[2] = the job's claim
-- KEYS[3] = the job's done list
-- KEYS[4] = the job's payload
-- ARGV[1] = the sealed result
-- ARGV[2] = result ttl ms
-- ARGV[3] = how long the claim stays 'done' (ms: replay window or result ttl)
-- returns 1 stored by this call, 0 a result was already there (the first one
--   is kept unchanged).

return store_job(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3])
