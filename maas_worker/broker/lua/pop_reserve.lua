-- Take up to ARGV[1] messages from the sources, first source first, and
-- reserve each in kombu's unacked hash and index in the same atomic step
-- (fetch.py). A source is a plain list (kombu's: taken from the right) or a
-- job queue under fair share (docs/compute.md "Fair share"): its old single
-- list first, then its tenant ring:
--
--   ring   = the tenants with work at this priority, a list; the one at the
--            right end has the turn;
--   credit = takes already given in the current turn of each tenant in the
--            ring (a tenant is in the ring iff it is here; counted only for a
--            weight above 1);
--   arrivals = tenants that pushed (producers SADD their own name after each
--            push); admitted at the left end, so a newcomer waits at most one
--            turn of each tenant already waiting;
--   tenant list = ARGV[5] .. queue .. '.' .. tenant;
--   weight = KEYS[3][tenant] (workers write it from the keyring; absent: 1):
--            the takes a tenant gets per turn (weighted round robin), read
--            once per take and tenant (a change holds at the next take).
--
-- Each take costs O(1) in tenants and jobs: at most ARGV[8] arrivals looked
-- at and a bounded number of stale ring entries dropped.
--
-- Cost (docs/benchmarks.md, "Fair share"): every redis.call() costs about as
-- much as the work it does here, so the common cases are kept to few calls.
-- One EXISTS tells that a source and the next one's list and arrivals are
-- empty (a priority with nothing queued costs one call, as an empty RPOP did
-- before fair share), and whether any tenant has a weight (the hash exists)
-- at all; the front tenant is read and moved to the back in one LMOVE (its
-- turn is usually one take), and moved back only if its weighted turn goes on.
--
-- An entry that is not JSON or has no delivery tag cannot be reserved under a
-- tag: it is popped and returned unreserved, and the consumer drops it.
-- KEYS[1] = kombu's unacked hash
-- KEYS[2] = kombu's unacked index
-- KEYS[3] = the tenants' weights (hash)
-- KEYS[4..] = the sources, in order, each one key or four (ARGV[6] says):
--   a list; or a fair job queue's old list, ring, credit hash, arrivals set
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
--   and again); 'r' a fair job queue (four keys, reserved)
-- ARGV[7] = the ring key prefix (after ARGV[5]; the rest is the queue name)
-- ARGV[8] = arrivals admitted at most per take and ring
-- ARGV[9] = the highest weight honoured
-- returns a flat list {queue, source, message, delivery tag ('' when not
-- reserved), ...}: queue the consumed queue (no prefix, no priority suffix),
-- source the list it came from (no prefix: where a restore puts it back).

local out = {}
local want = tonumber(ARGV[1]) * 4
local maxlen = tonumber(ARGV[3])
local prefix = ARGV[5]
local flags = ARGV[6]
local admit_max = tonumber(ARGV[8])
local max_weight = tonumber(ARGV[9])
-- Stale ring entries (a tenant list emptied behind the ring's back) dropped
-- per take at most: a bound, so one take stays O(1); the next drops more.
local STALE_MAX = 32
-- Whether KEYS[3] exists (nil: not known yet): without it every weight is 1
-- and no tenant's weight is read.
local weighted = nil
-- Weights read in this take (a batch take reads each tenant's once).
local weights = {}

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
  if weighted == false then return 1 end
  local w = weights[tenant]
  if w then return w end
  w = tonumber(redis.call('HGET', KEYS[3], tenant))
  if not w or w < 1 then w = 1
  elseif w > max_weight then w = max_weight
  else w = math.floor(w) end
  weights[tenant] = w
  return w
end

-- The sources: kind[s] ('1', '0' or 'r') and at[s], the index of its first key.
local n = #flags
local kind, at = {}, {}
do
  local k = 4
  for s = 1, n do
    local f = string.sub(flags, s, s)
    kind[s], at[s] = f, k
    if f == 'r' then k = k + 4 else k = k + 1 end
  end
end

-- How many of these keys exist: source s's keys, and the keys that must be
-- empty before source s + 1's ring (its old list and its arrivals) when
-- ahead is set. The first call of a take also learns whether KEYS[3]
-- exists: it is named once more than there are other keys, so the count is
-- (those that exist) + (that many + 1 if KEYS[3] exists).
local function exists(s, ahead)
  local keys = {KEYS[at[s]]}
  if kind[s] == 'r' then
    keys[2], keys[3] = KEYS[at[s] + 1], KEYS[at[s] + 3]
  end
  if ahead and s < n then
    local k = at[s + 1]
    keys[#keys + 1] = KEYS[k]
    if kind[s + 1] == 'r' then keys[#keys + 1] = KEYS[k + 3] end
  end
  local others = #keys
  if weighted == nil then
    for _ = 1, others + 1 do keys[#keys + 1] = KEYS[3] end
  end
  local found = redis.call('EXISTS', unpack(keys))
  if weighted == nil then
    weighted = found > others
    found = found % (others + 1)
  end
  return found
end

-- Take from list key while it has messages; false if it had none.
local function take_list(key, reserving)
  local source = string.sub(key, #prefix + 1)
  local queue = source
  local sep = string.find(queue, ARGV[4], 1, true)
  if sep then queue = string.sub(queue, 1, sep - 1) end
  local any = false
  while #out < want do
    local msg = redis.call('RPOP', key)
    if not msg then return any end
    any = true
    local tag = ''
    if reserving then tag = reserve(msg, queue) end
    emit(queue, source, msg, tag)
  end
  return any
end

-- Tenant names from the arrivals set: whoever can push wrote them, so each
-- is checked (a tenant name, not already in the ring, with work queued).
local function admit(queue, ring, credit, arrivals)
  local names = redis.call('SPOP', arrivals, admit_max)
  for _, t in ipairs(names) do
    -- HSETNX: membership checked and taken in one call (most arrivals are
    -- tenants already in the ring: a push names its tenant every time).
    if #t <= 63 and string.find(t, '^[a-z0-9][a-z0-9._-]*$')
       and redis.call('HSETNX', credit, t, 0) == 1 then
      if redis.call('LLEN', prefix .. queue .. '.' .. t) > 0 then
        redis.call('LPUSH', ring, t)
      else
        redis.call('HDEL', credit, t)
      end
    end
  end
end

local function take_ring(ring, credit)
  local queue = string.sub(ring, #prefix + #ARGV[7] + 1)
  local stale = 0
  while #out < want do
    -- The front tenant, moved to the back at once: with weight 1 (the
    -- default) its turn is this one take. Until the end of this loop turn it
    -- is at the left end.
    local t = redis.call('LMOVE', ring, ring, 'RIGHT', 'LEFT')
    if not t then return end
    local source = queue .. '.' .. t
    local list = prefix .. source
    local msg = redis.call('RPOP', list)
    if not msg then
      -- Nothing queued after all: out of the ring.
      redis.call('LPOP', ring)
      redis.call('HDEL', credit, t)
      stale = stale + 1
      if stale >= STALE_MAX then return end
    else
      emit(queue, source, msg, reserve(msg, source))
      if redis.call('LLEN', list) == 0 then
        -- Nothing more queued: out of the ring (a push announces it again).
        redis.call('LPOP', ring)
        redis.call('HDEL', credit, t)
      else
        local w = weight(t)
        if w > 1 then
          if redis.call('HINCRBY', credit, t, 1) < w then
            -- Its turn goes on: back to the front.
            redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
          else
            -- Turn over (it stays at the back): the next starts afresh.
            redis.call('HSET', credit, t, 0)
          end
        end
      end
    end
  end
end

-- What is known of the next source's old list and arrivals: 'unknown',
-- 'empty' or 'some' (at least one of them holds something).
local known = 'unknown'
for s = 1, n do
  if #out >= want then break end
  local k = at[s]
  local fair = kind[s] == 'r'
  local this, nxt = known, 'unknown'
  -- Whether something exists in this list or the next source's old list and
  -- arrivals (and nothing else was looked at).
  local list_or_next = false
  if known == 'unknown' then
    local found = exists(s, true)
    if found == 0 then
      this, nxt = 'skip', 'empty'
    elseif s < n and fair then
      local own = exists(s, false)
      if own == 0 then this = 'skip' else this = 'some' end
      if own == found then nxt = 'empty' else nxt = 'some' end
    else
      this, list_or_next = 'some', not fair
    end
  end
  if this == 'some' then
    -- The old list first (jobs from before fair share), then the arrivals.
    local any = take_list(KEYS[k], kind[s] ~= '0')
    if list_or_next and not any and s < n then nxt = 'some' end
    if fair and #out < want then
      admit(string.sub(KEYS[k + 1], #prefix + #ARGV[7] + 1), KEYS[k + 1], KEYS[k + 2], KEYS[k + 3])
    end
  end
  if fair and this ~= 'skip' and #out < want then
    take_ring(KEYS[k + 1], KEYS[k + 2])
  end
  known = nxt
end
return out
