-- Take up to ARGV[1] messages from the sources, first source first, and
-- reserve each in kombu's unacked hash and index in the same atomic step
-- (fetch.py). A source is a plain list (kombu's: taken from the right) or a
-- priority's tenant ring (fair share, docs/compute.md "Fair share"):
--
--   ring   = the tenants with work at this priority, a list; the one at the
--            right end has the turn;
--   credit = hash ring .. ':credit': takes already given in the current turn
--            of each tenant in the ring (a tenant is in the ring iff it is
--            here; written only for a weight above 1);
--   arrivals = set ARGV[8] .. queue: tenants that pushed (producers SADD
--            their own name after each push); admitted at the left end, so a
--            newcomer waits at most one turn of each tenant already waiting;
--   tenant list = ARGV[5] .. queue .. '.' .. tenant;
--   weight = KEYS[3][tenant] (workers write it from the keyring; default 1):
--            the takes a tenant gets per turn (weighted round robin), read at
--            each take from the tenant (one HGET: a change holds at once).
--
-- Each take costs O(1) in tenants and jobs: at most ARGV[9] arrivals looked
-- at and a bounded number of stale ring entries dropped.
-- An entry that is not JSON or has no delivery tag cannot be reserved under a
-- tag: it is popped and returned unreserved, and the consumer drops it.
-- KEYS[1] = kombu's unacked hash
-- KEYS[2] = kombu's unacked index
-- KEYS[3] = the tenants' weights (hash)
-- KEYS[4..] = the sources, in order: a list, or a ring key (ARGV[6] says which)
-- ARGV[1] = how many messages at most
-- ARGV[2] = now (seconds, kombu's index score)
-- ARGV[3] = the longest message worth decoding (longer ones are popped
--   unreserved: the consumer refuses them anyway)
-- ARGV[4] = kombu's priority separator
-- ARGV[5] = the key prefix (stripped from the queue name recorded for
--   restoring)
-- ARGV[6] = one flag per source: '1' a list, reserve what is taken; '0' a
--   list, do not (a no-ack consumer's queue, such as a remote-control reply:
--   never acknowledged, a reservation would be put back by the sweep again
--   and again); 'r' a tenant ring (reserved)
-- ARGV[7] = the ring key prefix (after ARGV[5]; the rest is the queue name)
-- ARGV[8] = the arrivals key prefix (after ARGV[5])
-- ARGV[9] = arrivals admitted at most per take and ring
-- ARGV[10] = the highest weight honoured
-- returns a flat list {queue, source, message, delivery tag ('' when not
-- reserved), ...}: queue the consumed queue (no prefix, no priority suffix),
-- source the list it came from (no prefix: where a restore puts it back).

local out = {}
local want = tonumber(ARGV[1]) * 4
local maxlen = tonumber(ARGV[3])
local prefix = ARGV[5]
local flags = ARGV[6]
local admit_max = tonumber(ARGV[9])
local max_weight = tonumber(ARGV[10])
-- Stale ring entries (a tenant list emptied behind the ring's back) dropped
-- per take at most: a bound, so one take stays O(1); the next drops more.
local STALE_MAX = 32

local function reserve(msg, restore_to)
  if #msg > maxlen then return '' end
  local ok, m = pcall(cjson.decode, msg)
  local tag = ok and type(m) == 'table' and type(m.properties) == 'table'
              and m.properties.delivery_tag
  if type(tag) ~= 'string' or tag == '' then return '' end
  -- The message text itself, not a re-encoding: cjson would turn an empty
  -- list into an object and round numbers.
  redis.call('HSET', KEYS[1], tag, '[' .. msg .. ',"",' .. cjson.encode(restore_to) .. ']')
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  return tag
end

local function emit(queue, source, msg, tag)
  out[#out + 1] = queue
  out[#out + 1] = source
  out[#out + 1] = msg
  out[#out + 1] = tag
end

local function weight(tenant)
  local w = tonumber(redis.call('HGET', KEYS[3], tenant))
  if not w or w < 1 then return 1 end
  if w > max_weight then return max_weight end
  return math.floor(w)
end

-- One tenant name from the arrivals set: whoever can push wrote it, so it is
-- checked (a tenant name, with work queued, not already in the ring).
local function admit(queue, ring, credit, arrivals)
  local names = redis.call('SPOP', arrivals, admit_max)
  for _, t in ipairs(names) do
    if #t <= 63 and string.find(t, '^[a-z0-9][a-z0-9._-]*$')
       and redis.call('HEXISTS', credit, t) == 0
       and redis.call('LLEN', prefix .. queue .. '.' .. t) > 0 then
      redis.call('LPUSH', ring, t)
      redis.call('HSET', credit, t, 0)
    end
  end
end

local function take_ring(key)
  local queue = string.sub(key, #prefix + #ARGV[7] + 1)
  local credit = key .. ':credit'
  admit(queue, key, credit, prefix .. ARGV[8] .. queue)
  local stale = 0
  while #out < want do
    local t = redis.call('LINDEX', key, -1)
    if not t then return end
    local source = queue .. '.' .. t
    local list = prefix .. source
    local msg = redis.call('RPOP', list)
    if not msg then
      -- Nothing queued after all: out of the ring.
      redis.call('RPOP', key)
      redis.call('HDEL', credit, t)
      stale = stale + 1
      if stale >= STALE_MAX then return end
    else
      emit(queue, source, msg, reserve(msg, source))
      if redis.call('LLEN', list) == 0 then
        -- Nothing more queued: out of the ring (a push announces it again).
        redis.call('RPOP', key)
        redis.call('HDEL', credit, t)
      else
        local w = weight(t)
        -- Weight 1 (the default) writes nothing but the move: its turn is one take.
        if w == 1 or redis.call('HINCRBY', credit, t, 1) >= w then
          -- Turn over: to the back of the ring, the next turn starts afresh.
          if w > 1 then redis.call('HSET', credit, t, 0) end
          redis.call('LMOVE', key, key, 'RIGHT', 'LEFT')
        end
      end
    end
  end
end

local function take_list(i, key)
  local reserving = string.sub(flags, i, i) == '1'
  local source = string.sub(key, #prefix + 1)
  local queue = source
  local sep = string.find(queue, ARGV[4], 1, true)
  if sep then queue = string.sub(queue, 1, sep - 1) end
  while #out < want do
    local msg = redis.call('RPOP', key)
    if not msg then return end
    local tag = ''
    if reserving then tag = reserve(msg, queue) end
    emit(queue, source, msg, tag)
  end
end

for i = 4, #KEYS do
  if #out >= want then break end
  if string.sub(flags, i - 3, i - 3) == 'r' then
    take_ring(KEYS[i])
  else
    take_list(i - 3, KEYS[i])
  end
end
return out
