-- Renew a claim's lease, only by its holder.
-- KEYS[1] = the job's claim
-- ARGV[1] = holder id
-- ARGV[2] = lease ms
-- returns 1 renewed, 0 the claim is not (or no longer) this holder's.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
