-- A key joins its account, unless the account already holds its maximum of keys (deleted
-- keys do not count): one check-and-add, so concurrent creations cannot pass the cap together.
--
-- KEYS[1] = the account's key-id set       gw:{acct:<id>}:keys
-- KEYS[2] = the account's deleted-key set  gw:{acct:<id>}:deleted-keys
-- ARGV[1] = the new key's id
-- ARGV[2] = the most keys an account may hold
-- returns 1 when added, 0 when the account is full

if redis.call('SCARD', KEYS[1]) - redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
