-- Take a job's claim (claims.JobGuard.claim_job): the replay check, the lease,
-- the attempt count and, for a tenant with quotas, the quota charge, atomically.
-- uses: bucket, admit
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
-- Every check comes before the first write, and no step can fail on what a
-- Redis writer left in a key (a GET of another type, a count that is not a
-- number): a script error here once left a job claimed and its attempt
-- counted, and the job requeued for ever.

if redis.call('EXISTS', KEYS[2]) == 1 then return {'replayed', ''} end
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' then cur = false end
if cur == 'done' then return {'replayed', ''} end
if cur then return {'busy', ''} end
if ARGV[5] ~= '1' then
  local c = redis.pcall('GET', KEYS[4])
  if type(c) == 'string' then return {'cancelled', c} end
end
local prev = redis.pcall('GET', KEYS[3])
local n = type(prev) == 'string' and tonumber(prev) or 0
if n ~= n or n < 0 then n = 0 end
n = math.min(math.floor(n), 1000000) + 1
if n > tonumber(ARGV[4]) then
  -- Held so that the caller can store its failed result; never run, never charged.
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SET', KEYS[3], n, 'PX', ARGV[3])
  return {'exhausted', ''}
end
if #KEYS > 4 then
  local v = admit(KEYS[5], KEYS[6], KEYS[7], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]),
                  tonumber(ARGV[9]), tonumber(ARGV[10]))
  if v[1] == 0 then return {'rate_limited', string.format('%d', v[2])} end
  if v[1] == -1 then return {'rate_limited', ''} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[3], n, 'PX', ARGV[3])
return {'claimed', ''}
