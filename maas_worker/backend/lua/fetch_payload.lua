-- Read a claim-checked request without pulling an oversized one over the wire.
-- KEYS[1] = the job's payload
-- ARGV[1] = max bytes
-- returns the payload; false if absent (or not a string); -1 if over max bytes.

if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return false end
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return -1 end
return redis.call('GET', KEYS[1])
