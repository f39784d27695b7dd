-- A prefix of a queue's oldest message (backlog.read_backlog reads its
-- envelope's issued-at), so a 1 MiB job costs a few KiB per read.
-- Run as the read-only library function maas_v2_tail_prefix (functions.py).
-- KEYS[1] = the queue's list
-- ARGV[1] = how many bytes
-- returns the prefix; false if the queue is empty.

local m = redis.call('LINDEX', KEYS[1], -1)
if not m then return false end
return string.sub(m, 1, tonumber(ARGV[1]))
