-- Take the claims of a batch of jobs (claims.JobGuard.claim_many, the batch
-- consumer) in one call: for each job in turn, claim_job.lua, what claim.lua
-- does for one (the same checks, outcomes and quota charge). Each job's claim
-- is decided on its own: a job whose commands fail (a tenant's quota key of
-- another type) gets 'error' and the others go on; as in claim.lua, every
-- check that can fail comes before that job's first write.
-- uses: claim_job, job_error
-- KEYS[1..] = per job, 4 keys (job i at 4i-3 to 4i): its claim, result,
--   attempt count and cancel request; then, once per tenant with a quota, 3
--   keys: its token bucket, in-flight set and pending set
-- ARGV[1] = holder id
-- ARGV[2] = lease ms
-- ARGV[3] = max attempts
-- ARGV[4] = the number of jobs
-- ARGV[5..] = per job, in order: the attempt count's window ms; q, 0 for no
--   quota, else the index in KEYS of its tenant's token bucket (the in-flight
--   and pending sets follow it); and only when q > 0, five more: job id, rate
--   per s, burst, max in flight, the job's expiry ms
-- returns {outcome 1, detail 1, outcome 2, detail 2, ...}: per job claim.lua's
--   reply, or 'error' with the error's text when a command of its claim failed.

local holder, lease_ms, max_attempts = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
local a = 5
for i = 1, tonumber(ARGV[4]) do
  local k = 4 * i - 3
  local window_ms, q = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local quota = nil
  if q > 0 then
    quota = {KEYS[q], KEYS[q + 1], KEYS[q + 2],
             ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]}
    a = a + 5
  end
  local ok, v = pcall(claim_job, KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], holder,
                      lease_ms, window_ms, max_attempts, false, quota)
  if not ok then v = {'error', job_error(v)} end
  out[2 * i - 1] = v[1]
  out[2 * i] = v[2]
end
return out
