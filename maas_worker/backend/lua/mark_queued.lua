-- The queued markers of a batch of jobs (docs/protocol.md 3.9) in one call, one
-- reply for the batch: 'mark' writes each marker (SET ... EX, as a producer does
-- after the push); 'claim' (the HTTP gateway, before the push) first records
-- each job id with its envelope's hash (SET NX GET: idempotency on the job id),
-- and writes the marker (NX) only for an id seen for the first time.
-- Run as the library function maas_v2_mark_queued (functions.py;
-- docs/protocol.md 7), not EVAL: a producer's Redis user may call the
-- library's functions but not send Lua of its own.
-- KEYS[1..n] = each job's queued marker (maas:{T}:job:<job>)
-- KEYS[n+1..2n] = 'claim' only: each job's idempotency record (maas:{T}:gateway:<job>)
-- ARGV[1] = 'mark' or 'claim'
-- ARGV[2] = the jobs' fields, separated by single spaces, job after job in the
--   order of KEYS: 'mark': expires_at_ms marker_ttl_s; 'claim': expires_at_ms
--   marker_ttl_s envelope_hash record_ttl_s (one string: a few thousand
--   arguments cost the caller more to pack than this costs to split)
-- returns one character per job, in order: 'q' the marker was written;
--   'claim' only: 'k' the id is new but a marker was there (kept), 's' the
--   id was recorded before with this hash, 'c' with another hash (for 's'
--   and 'c' nothing is written).

local claim = ARGV[1] == 'claim'
if not claim and ARGV[1] ~= 'mark' then return redis.error_reply('ERR mode is mark or claim') end
local n = claim and #KEYS / 2 or #KEYS
local f, k, out = {}, 0, {}
for w in string.gmatch(ARGV[2], '[^ ]+') do k = k + 1; f[k] = w end
if k ~= (claim and 4 or 2) * n then return redis.error_reply('ERR fields do not match keys') end
if not claim then
  for i = 1, n do
    redis.call('SET', KEYS[i], f[2 * i - 1], 'EX', f[2 * i])
    out[i] = 'q'
  end
  return table.concat(out)
end
for i = 1, n do
  local a = 4 * i - 3
  local before = redis.call('SET', KEYS[n + i], f[a + 2], 'NX', 'GET', 'EX', f[a + 3])
  if before then
    out[i] = before == f[a + 2] and 's' or 'c'
  elseif redis.call('SET', KEYS[i], f[a], 'EX', f[a + 1], 'NX') then
    out[i] = 'q'
  else
    out[i] = 'k'
  end
end
return table.concat(out)
