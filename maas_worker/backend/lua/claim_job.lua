-- One job's claim, written once for claim.lua (a job) and claim_batch.lua (a
-- batch of jobs): the replay check, the lease, the attempt count and, for a
-- tenant with quotas, the quota charge.
-- prelude: defines claim_job(claim, result, attempts, cancel, holder, lease_ms,
--   window_ms, max_attempts, ignore_cancel, quota); uses no KEYS or ARGV.
-- uses: bucket, admit
-- claim_job() returns {outcome, detail} (claim.lua's reply). The arguments: the
--   job's claim, result, attempt count and cancel request keys, the holder id,
--   the lease ms, the attempt count's window ms, max attempts (a number),
--   ignore_cancel (a boolean), and quota: nil (no quota) or {bucket, in-flight
--   set, pending set, job id, rate per s, burst, max in flight, expiry ms}.
-- Every check comes before the first write, and no step can fail on what a
-- Redis writer left in a job's key (a GET of another type, a count that is not
-- a number): a script error here once left a job claimed and its attempt
-- counted, and the job requeued for ever. Only the tenant's quota keys (the
-- workers' own) can make it fail, and that before any write.

local function claim_job(claim, result, attempts, cancel, holder, lease_ms, window_ms,
                         max_attempts, ignore_cancel, quota)
  if redis.call('EXISTS', result) == 1 then return {'replayed', ''} end
  local cur = redis.pcall('GET', claim)
  if type(cur) == 'table' then cur = false end
  if cur == 'done' then return {'replayed', ''} end
  if cur then return {'busy', ''} end
  if not ignore_cancel then
    local c = redis.pcall('GET', cancel)
    if type(c) == 'string' then return {'cancelled', c} end
  end
  local prev = redis.pcall('GET', attempts)
  local n = type(prev) == 'string' and tonumber(prev) or 0
  if n ~= n or n < 0 then n = 0 end
  n = math.min(math.floor(n), 1000000) + 1
  if n > max_attempts then
    -- Held so that the caller can store its failed result; never run, never charged.
    redis.call('SET', claim, holder, 'PX', lease_ms)
    redis.call('SET', attempts, n, 'PX', window_ms)
    return {'exhausted', ''}
  end
  if quota then
    local v = admit(quota[1], quota[2], quota[3], quota[4], tonumber(quota[5]),
                    tonumber(quota[6]), tonumber(quota[7]), tonumber(quota[8]))
    if v[1] == 0 then return {'rate_limited', string.format('%d', v[2])} end
    if v[1] == -1 then return {'rate_limited', ''} end
  end
  redis.call('SET', claim, holder, 'PX', lease_ms)
  redis.call('SET', attempts, n, 'PX', window_ms)
  return {'claimed', ''}
end
