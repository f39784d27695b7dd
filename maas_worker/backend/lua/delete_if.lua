-- Delete a key only if it still holds ARGV[1]: a claim only by its holder, a
-- refused cancel request only if the job's own tenant has not replaced it.
-- KEYS[1] = the key (a claim, a cancel request)
-- ARGV[1] = the value it must hold
-- returns 1 deleted, 0 not.

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
