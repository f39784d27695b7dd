-- Hand taken messages back to the lists they came from, each only while its
-- reservation is still held (kombu's unacked hash has its delivery tag),
-- for a batch consumer (worker/batch/consumer.py). One that the visibility
-- sweep already put back (the consumer was cut off from Redis for longer
-- than the visibility timeout, its reservations not refreshed) is dropped:
-- the swept copy is the job now, and a second copy would be refused
-- `replayed`, a false security event. Checking and pushing in one script,
-- a crash can neither lose a message nor push it twice.
-- A message handed back goes to the right end of its list (taken next), its
-- tenant to the queue's arrivals (for a tenant's list), and a wake-up token
-- is rung.
-- KEYS[1] = kombu's unacked hash
-- KEYS[2] = kombu's unacked index
-- KEYS[3] = the wake-up list
-- ARGV[1] = the wake-up list's longest length
-- ARGV[2..] = five per message: its delivery tag, its list, the message,
--   the arrivals set of its queue and its tenant (both '' for a queue's own
--   list)
-- returns the delivery tags handed back (the others were no longer held)

local back = {}
for i = 2, #ARGV, 5 do
  local tag = ARGV[i]
  if redis.call('HDEL', KEYS[1], tag) == 1 then
    redis.call('ZREM', KEYS[2], tag)
    redis.call('RPUSH', ARGV[i + 1], ARGV[i + 2])
    if ARGV[i + 4] ~= '' then redis.call('SADD', ARGV[i + 3], ARGV[i + 4]) end
    back[#back + 1] = tag
  end
end
if #back > 0 then
  redis.call('LPUSH', KEYS[3], '1')
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[1]) - 1)
end
return back
