-- The key ids of one account (or one of them) and Redis time, read on the account's slot,
-- as the first step of a usage read.
--
-- KEYS[1] = the account's key-id set   gw:{acct:<id>}:keys
-- ARGV[1] = a key id to look for, or '' for all the account's keys
-- returns {now_seconds, now_microseconds, key_id...}; only ARGV[1] when it is a member

local t = redis.call('TIME')
local out = {t[1], t[2]}
if ARGV[1] ~= '' then
  if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then out[3] = ARGV[1] end
  return out
end
for i, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do out[i + 2] = id end
return out
