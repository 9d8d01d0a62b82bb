-- An account's own limits, shared by all its keys (admit.lua reads them): set or cleared
-- in one step, so an admission sees all of a change or none of it.
--
-- KEYS[1] = account record hash    gw:{acct:<id>}:account
-- ARGV[1...] = field, value pairs: rpm, tpm or max_concurrent, each a positive integer or
--           '' to clear (no limit of the account's); windows, budget windows as admit.lua
--           reads them ('' none; a window's spent carries on while its duration stays)
-- returns 1 when applied, 0 when there is no such account

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
