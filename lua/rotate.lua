-- Secret rotation, step one: swap the stored secret hash of a key atomically. Admission
-- compares this field with the presented secret, so the old secret stops working here.
-- The caller then maps the new hash and deletes the mapping of the returned old one.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- ARGV[1] = SHA-256 of the new secret (hex)
-- returns the old hash, or false when the record does not exist

local old = redis.call('HGET', KEYS[1], 'hash')
if not old then return false end
redis.call('HSET', KEYS[1], 'hash', ARGV[1])
return old
