-- Store the results of a batch of jobs (claims.JobGuard.store_many, the batch
-- consumer) in one call: for each job in turn, store_job.lua, what store.lua
-- does for one (write-once result, claim done, payload deleted, done list
-- pushed). A job whose commands fail gets its error's text and the others are
-- stored as usual.
-- uses: store_job, job_error
-- KEYS[1..] = per job, 4 keys (job i at 4i-3 to 4i): its result, claim, done
--   list and payload
-- ARGV[1] = result ttl ms
-- ARGV[2..] = per job, 2 arguments (job i at 2i and 2i+1): the sealed result,
--   and how long its claim stays 'done' (ms: replay window or result ttl)
-- returns per job, in order: 1 stored by this call, 0 a result was already
--   there (kept unchanged), or the error's text when a command of its store
--   failed.

local ttl_ms = ARGV[1]
local out = {}
for i = 1, #KEYS / 4 do
  local k = 4 * i - 3
  local ok, v = pcall(store_job, KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
                      ARGV[2 * i], ttl_ms, ARGV[2 * i + 1])
  out[i] = ok and v or job_error(v)
end
return out
