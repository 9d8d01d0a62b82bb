-- A key is deleted: its secret stops matching at once (admission compares the stored hash,
-- which goes), it stops counting towards the account's maximum of keys, and its record and
-- usage counters stay, so its history remains readable.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = the account's deleted-key set   gw:{acct:<id>}:deleted-keys
-- ARGV[1] = the key's id
-- returns the old secret hash (the caller deletes its mapping), '' when already deleted,
--   or false when the record does not exist

if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local old = redis.call('HGET', KEYS[1], 'hash') or ''
if (redis.call('HGET', KEYS[1], 'deleted_at') or '') ~= '' then return '' end
local t = redis.call('TIME')
redis.call('HDEL', KEYS[1], 'hash')
redis.call('HSET', KEYS[1], 'active', '0',
  'deleted_at', string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])))
redis.call('SADD', KEYS[2], ARGV[1])
return old
