-- Take a job's claim (claims.JobGuard.claim_job): the replay check, the lease,
-- the attempt count and, for a tenant with quotas, the quota charge, atomically.
-- The body is claim_job.lua's (claim_batch.lua runs the same for a batch).
-- uses: claim_job
-- KEYS[1] = the job's claim (the lease: its holder's id, or 'done')
-- KEYS[2] = the job's result
-- KEYS[3] = the job's attempt count
-- KEYS[4] = the job's cancel request
-- KEYS[5] = the tenant's token bucket (KEYS[5..7] only with a quota)
-- KEYS[6] = the tenant's in-flight set
-- KEYS[7] = the tenant's pending set
-- ARGV[1] = holder id
-- ARGV[2] = lease ms
-- ARGV[3] = attempt count window ms (how long the count is kept)
-- ARGV[4] = max attempts
-- ARGV[5] = '1': ignore a cancel request
-- ARGV[6] = job id (ARGV[6..10] only with a quota)
-- ARGV[7] = rate per s
-- ARGV[8] = burst
-- ARGV[9] = max in flight
-- ARGV[10] = the job's expiry ms
-- returns {outcome, detail}: 'claimed', 'busy', 'replayed', 'exhausted' (detail
--   ''), 'cancelled' (the cancel token), 'rate_limited' (the wait ms; '' when
--   over the in-flight cap).

local quota = nil
if #KEYS > 4 then
  quota = {KEYS[5], KEYS[6], KEYS[7], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]}
end
return claim_job(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3],
                 tonumber(ARGV[4]), ARGV[5] == '1', quota)
