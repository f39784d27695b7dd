-- Highest release serial seen per model (runtime.RedisReleaseFloor): store
-- ARGV[2] if it is higher than the stored one.
-- KEYS[1] = the release hash (maas:releases)
-- ARGV[1] = model name
-- ARGV[2] = release serial
-- returns the highest serial now stored (as stored, so never rounded).

local raw = redis.call('HGET', KEYS[1], ARGV[1])
local cur = tonumber(raw)
if cur == nil or tonumber(ARGV[2]) > cur then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return ARGV[2]
end
return raw
