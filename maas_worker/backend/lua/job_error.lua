-- What the batch scripts (claim_batch.lua, store_batch.lua) reply for one job
-- whose commands failed, so that the other jobs of the batch are decided as
-- usual.
-- prelude: defines job_error(e), e being what pcall caught; uses no KEYS or ARGV.
-- job_error() returns the error's text: redis.call raises a table whose err
--   field is the reply's text ('WRONGTYPE Operation against ...'); anything
--   else is turned into a string.

local function job_error(e)
  if type(e) == 'table' and e.err then return tostring(e.err) end
  return tostring(e)
end
