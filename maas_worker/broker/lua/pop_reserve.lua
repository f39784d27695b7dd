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
--   tenant list = the old list's name .. '.' .. tenant;
--   weight = KEYS[3][tenant] (workers write it from the keyring; absent: 1):
--            the takes a tenant gets per turn (weighted round robin), read
--            once per take and tenant (a change holds from the next take).
--
-- Each take costs O(1) in tenants and jobs: at most ARGV[7] arrivals looked
-- at and a bounded number of stale ring entries dropped.
--
-- Cost (docs/benchmarks.md, "Fair share"): each redis.call() costs about a
-- microsecond, as much as the work it does here, so the common cases take
-- few. One EXISTS tells that a source and the next one's old list and
-- arrivals are empty (an idle priority costs one call, as its empty RPOP did
-- before fair share), which of those two are not, and whether any tenant has
-- a weight at all (the hash exists); the front tenant is read and moved to
-- the back in one LMOVE (its turn is usually one take), and moved back only
-- while a weighted turn goes on. A busy priority's take is then EXISTS,
-- LMOVE, RPOP, the reservation (HSETNX, ZADD) and LLEN (does it leave the ring).
--
-- An entry that is not JSON or has no delivery tag cannot be reserved under a
-- tag: it is popped and returned unreserved, and the consumer drops it. An
-- entry whose tag is already reserved (another message holds it) is not
-- taken: it goes back to the far end of its list until that reservation ends.
-- KEYS[1] = kombu's unacked hash
-- KEYS[2] = kombu's unacked index
-- KEYS[3] = the tenants' weights (hash)
-- KEYS[4..] = the sources, in order, each one key or four (ARGV[6] says):
--   a list; or a fair job queue's old list (named as the queue), ring,
--   credit hash, arrivals set. Every key but the tenant lists is named here.
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
--   and again); 'r' a fair job queue (four keys), 'n' one whose old list
--   is taken unreserved (as '0'; what its ring gives is reserved)
-- ARGV[7] = arrivals admitted at most per take and ring
-- ARGV[8] = the highest weight honoured
-- returns a flat list {queue, source, message, delivery tag ('' when not
-- reserved), ...}: queue the consumed queue (no prefix, no priority suffix),
-- source the list it came from (no prefix: where a restore puts it back).

-- Kept lean: here plain Lua (a table, a closure, a string.sub) costs a
-- noticeable share of a take, so the sources are walked in place.
local out = {}
local o = 0  -- #out
local want = tonumber(ARGV[1]) * 4
local maxlen = tonumber(ARGV[3])
local prefix = ARGV[5]
local flags = ARGV[6]
local n = #flags
-- string.byte of the flags: a fair job queue whose old list is reserved, or
-- not ('r', 'n'), a plain list reserved ('1').
local FAIR, FAIR_NO_ACK, RESERVED = 114, 110, 49
-- The tail searched for the delivery tag: its key, a tag of up to 64
-- characters, the closing quote and braces.
local TAIL = 17 + 64 + 3
-- Whether KEYS[3] exists (nil: not known yet): without it every weight is 1
-- and no tenant's weight is read.
local weighted = nil
-- Weights read in this take (a batch take reads each tenant's once).
local weights = nil

local function reserve(msg, restore_to, list)
  if #msg > maxlen then return '' end
  -- The tag is read at the entry's end, where kombu and our clients write it
  -- (properties last, its delivery_tag last: docs/protocol.md 3.6), without
  -- decoding the entry: cjson.decode of a 1 KiB job was most of a take's
  -- server time (about 12 of 20 us). An entry in any other layout is decoded.
  -- What the match cannot prove (that the object it ends is the top-level
  -- "properties") the consumer checks on the entry it parses anyway: a tag
  -- that disagrees with the parsed one is refused as malformed (fetch.Taken).
  local tail = #msg - TAIL
  if tail < 1 then tail = 1 end
  local tag = string.match(msg, '"delivery_tag": "([%w%-]+)"}}$', tail)
  if not tag then
    local ok, m = pcall(cjson.decode, msg)
    tag = ok and type(m) == 'table' and type(m.properties) == 'table'
          and m.properties.delivery_tag
    if type(tag) ~= 'string' or tag == '' then return '' end
  end
  -- The message text itself, not a re-encoding: cjson would turn an empty
  -- list into an object and round numbers. HSETNX: a second entry with the
  -- tag of a message still reserved (a copy, or a tag chosen to match) must
  -- not replace that reservation, or acknowledging the one would drop the
  -- other's and a crash would lose it. The copy goes back to the far end of
  -- its list (`list`) to be taken once the reservation ends; nil tells the
  -- caller to stop taking from that list in this take (it may be the only
  -- entry there).
  if redis.call('HSETNX', KEYS[1], tag, '[' .. msg .. ',"",' .. cjson.encode(restore_to) .. ']') == 0 then
    redis.call('LPUSH', list, msg)
    return nil
  end
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  return tag
end

-- How many of keys exist. The first call of a take also learns whether
-- KEYS[3] exists: it is named once more than there are other keys, so the
-- count is (those that exist) + (that many + 1 if KEYS[3] exists).
local function exists(keys)
  local others = #keys
  if weighted ~= nil then return redis.call('EXISTS', unpack(keys)) end
  for i = others + 1, 2 * others + 1 do keys[i] = KEYS[3] end
  local found = redis.call('EXISTS', unpack(keys))
  weighted = found > others
  return found % (others + 1)
end

-- What source s's old list and arrivals hold: -1 not known yet, else
-- L + 2 * A (L: the list holds something, A: the arrivals do; a plain list
-- has no arrivals). Learnt for the next source with this one's EXISTS, which
-- names the next arrivals twice: one call tells that a source and the next
-- one's keys before its ring are empty, and which of those is not.
local known = -1
local k = 4  -- KEYS index of source s's first key
for s = 1, n do
  if o >= want then break end
  local flag = string.byte(flags, s)
  local fair = flag == FAIR or flag == FAIR_NO_ACK
  local list = KEYS[k]
  local pre, skip, nxt = known, false, -1
  -- Whether the last EXISTS counted only this list and the next source's keys.
  local list_or_next = false
  local found = 0
  if known == -1 then
    -- This source's keys and those of the next source that come before its
    -- ring (its old list, its arrivals).
    local nflag = s < n and string.byte(flags, s + 1)
    local nfair = nflag == FAIR or nflag == FAIR_NO_ACK
    if fair and nfair and weighted == nil then
      -- The common first call (high, then normal's list and arrivals),
      -- spelled out: a table and unpack() cost nearly what a call does.
      local w, na = KEYS[3], KEYS[k + 7]
      found = redis.call('EXISTS', list, KEYS[k + 1], KEYS[k + 3], KEYS[k + 4], na, na,
                         w, w, w, w, w, w, w)
      weighted = found > 6
      found = found % 7
    else
      local keys = {list}
      if fair then keys[2], keys[3] = KEYS[k + 1], KEYS[k + 3] end
      if s < n then
        local nk = fair and k + 4 or k + 1
        keys[#keys + 1] = KEYS[nk]
        if nfair then keys[#keys + 1], keys[#keys + 2] = KEYS[nk + 3], KEYS[nk + 3] end
      end
      found = exists(keys)
    end
    if found == 0 then
      skip, nxt = true, 0
    elseif fair and s < n then
      local own = exists({list, KEYS[k + 1], KEYS[k + 3]})
      skip, nxt = own == 0, found - own
    else
      list_or_next = not fair
    end
  end
  if not skip and fair then
    local ring, credit = KEYS[k + 1], KEYS[k + 2]
    -- The old list's name is the queue's.
    local queue = string.sub(list, #prefix + 1)
    if pre == -1 or pre % 2 == 1 then
      -- The old list first: jobs from before fair share.
      while o < want do
        local msg = redis.call('RPOP', list)
        if not msg then break end
        local tag = ''
        if flag == FAIR then tag = reserve(msg, queue, list) end
        if not tag then break end
        out[o + 1], out[o + 2], out[o + 3], out[o + 4] = queue, queue, msg, tag
        o = o + 4
      end
    end
    if (pre == -1 or pre >= 2) and o < want then
      -- Tenant names from the arrivals set: whoever can push wrote them, so
      -- each is checked (a tenant name, not already in the ring, with work
      -- queued). HSETNX checks membership and takes it in one call (most
      -- arrivals are tenants already in the ring: a push names its tenant
      -- every time).
      for _, t in ipairs(redis.call('SPOP', KEYS[k + 3], ARGV[7])) do
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
    -- Stale ring entries (a tenant list emptied behind the ring's back)
    -- dropped per take at most: a bound, so one take stays O(1).
    local stale = 0
    -- Tenants whose entry went back in this take (reserve() returned nil).
    local held = nil
    while o < want and stale < 32 do
      -- The front tenant, moved to the back at once: with weight 1 (the
      -- default) its turn is this one take. Until the end of this loop turn
      -- it is at the left end.
      local t = redis.call('LMOVE', ring, ring, 'RIGHT', 'LEFT')
      if not t or (held and held[t]) then break end  -- held: once round the ring
      local source = queue .. '.' .. t
      local tlist = source
      if prefix ~= '' then tlist = prefix .. source end
      local msg = redis.call('RPOP', tlist)
      local tag = msg and reserve(msg, source, tlist)
      if not msg then
        -- Nothing queued after all: out of the ring.
        redis.call('LPOP', ring)
        redis.call('HDEL', credit, t)
        stale = stale + 1
      elseif not tag then
        -- Its front entry's tag is reserved: put back, its turn passes (it
        -- stays in the ring).
        held = held or {}
        held[t] = true
      else
        out[o + 1], out[o + 2], out[o + 3], out[o + 4] = queue, source, msg, tag
        o = o + 4
        if redis.call('LLEN', tlist) == 0 then
          -- Nothing more queued: out of the ring (a push announces it again).
          redis.call('LPOP', ring)
          redis.call('HDEL', credit, t)
        elseif weighted ~= false then
          weights = weights or {}
          local w = weights[t]
          if not w then
            w = tonumber(redis.call('HGET', KEYS[3], t))
            if not w or w < 1 then w = 1
            elseif w > tonumber(ARGV[8]) then w = tonumber(ARGV[8])
            else w = math.floor(w) end
            weights[t] = w
          end
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
  elseif not skip then
    -- A plain list.
    local source = string.sub(list, #prefix + 1)
    local queue = source
    local sep = string.find(queue, ARGV[4], 1, true)
    if sep then queue = string.sub(queue, 1, sep - 1) end
    local reserving = flag == RESERVED
    local any = false
    if pre ~= 0 then
      while o < want do
        local msg = redis.call('RPOP', list)
        if not msg then break end
        any = true
        local tag = ''
        if reserving then tag = reserve(msg, queue, list) end
        if not tag then break end
        out[o + 1], out[o + 2], out[o + 3], out[o + 4] = queue, source, msg, tag
        o = o + 4
      end
    end
    -- Nothing here: what the EXISTS counted is the next source's.
    if list_or_next and not any then nxt = found end
  end
  known = nxt
  if fair then k = k + 4 else k = k + 1 end
end
return out
