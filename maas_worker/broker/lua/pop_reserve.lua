-- Pop up to ARGV[1] messages from the lists, first list first, and reserve
-- each in kombu's unacked hash and index in the same atomic step (fetch.py).
-- An entry that is not JSON or has no delivery tag cannot be reserved under a
-- tag: it is popped and returned unreserved, and the consumer drops it.
-- KEYS[1] = kombu's unacked hash
-- KEYS[2] = kombu's unacked index
-- KEYS[3..] = the lists to pop from, in order
-- ARGV[1] = how many messages at most
-- ARGV[2] = now (seconds, kombu's index score)
-- ARGV[3] = the longest message worth decoding (longer ones are popped
--   unreserved: the consumer refuses them anyway)
-- ARGV[4] = kombu's priority separator
-- ARGV[5] = the key prefix (stripped from the queue name recorded for
--   restoring)
-- ARGV[6] = one flag per list: '1' reserve what is taken, '0' do not (a
--   no-ack consumer's queue, such as a remote-control reply: never
--   acknowledged, a reservation would be put back by the sweep again and
--   again)
-- returns a flat list {list, message, delivery tag ('' when not reserved), ...}.

local out = {}
local want = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[3])
for i = 3, #KEYS do
  while #out < want * 3 do
    local msg = redis.call('RPOP', KEYS[i])
    if not msg then break end
    local reserved_as = ''
    if #msg <= maxlen and string.sub(ARGV[6], i - 2, i - 2) == '1' then
      local ok, m = pcall(cjson.decode, msg)
      local tag = ok and type(m) == 'table' and type(m.properties) == 'table'
                  and m.properties.delivery_tag
      if type(tag) == 'string' and tag ~= '' then
        local q = string.sub(KEYS[i], #ARGV[5] + 1)
        local sep = string.find(q, ARGV[4], 1, true)
        if sep then q = string.sub(q, 1, sep - 1) end
        -- The message text itself, not a re-encoding: cjson would turn an
        -- empty list into an object and round numbers.
        redis.call('HSET', KEYS[1], tag, '[' .. msg .. ',"",' .. cjson.encode(q) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
        reserved_as = tag
      end
    end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = msg
    out[#out + 1] = reserved_as
  end
  if #out >= want * 3 then break end
end
return out
