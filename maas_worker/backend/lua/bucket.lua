-- The token bucket and Redis's clock, shared by the quota scripts (admit.lua,
-- advise_many.lua): written once, prepended to the scripts that use it.
-- prelude: defines now_ms(), tokens_at(bucket, rate, burst, now),
--   wait_ms(need, rate), keep_ms(exp_ms, now); uses no KEYS or ARGV.
-- now_ms(): Redis's own clock (TIME), so hosts with different clocks share
--   one consistent bucket.
-- tokens_at(): the bucket's tokens now, refilled at `rate` a second up to
--   `burst` (a missing bucket is full).
-- wait_ms(): the wait for `need` more tokens (at most a day).
-- keep_ms(): how long a tenant's sets live (the job's remaining lifetime, at
--   most 8 days, plus a second).
-- Lua numbers are doubles printed with 14 digits: keep waits and TTLs small
-- integers.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function tokens_at(bucket, rate, burst, now)
  local b = redis.call('HMGET', bucket, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end
  return tokens
end
local function wait_ms(need, rate)
  return math.min(math.ceil(need * 1000 / rate), 86400000)
end
local function keep_ms(exp_ms, now)
  return math.min(math.max(exp_ms - now, 0), 691200000) + 1000
end
