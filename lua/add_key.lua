-- A key joins its account, unless the account already holds its maximum of keys: one
-- check-and-add, so concurrent creations cannot pass the cap together.
--
-- KEYS[1] = the account's key-id set   gw:{acct:<id>}:keys
-- ARGV[1] = the new key's id
-- ARGV[2] = the most keys an account may hold
-- returns 1 when added, 0 when the account is full

if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
