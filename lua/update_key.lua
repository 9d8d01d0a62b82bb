-- A key's settings change in one step, so an admission sees all of a change or none of it.
-- Deleted keys (deleted_at set) and missing ones are left alone.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = account record hash    gw:{acct:<id>}:account   (only with alerts, ARGV[4] > 0)
-- KEYS[3] = the account's alert outbox  gw:{acct:<id>}:alerts, a stream (idem)
-- ARGV[1] = '1' to restart the budget period now (its duration changed), else '0'
-- ARGV[2] = seconds from now the key expires ('' to leave expires_at as the fields say)
-- ARGV[3] = seconds to renew by: from the current expiry or now, whichever is later ('')
-- ARGV[4] = the alert outbox's cap, events per account ('0': no alerts). With alerts, an
--           active key made inactive here writes one key.deactivated event (the oldest
--           trimmed at the cap, counted in the account's alerts_dropped)
-- ARGV[5...] = field, value pairs to set ('' clears a limit: the key follows its plan)
-- returns {code, expires_at}
--   code (UpdateCode in gateway/store/codes.py): 0 updated, 1 missing key, 2 deleted,
--         3 expiry in the past, 4 expiry too late (after 9999-12-31, which dates can show)
--   expires_at: the key's expiry after the change ('' when none)

if redis.call('EXISTS', KEYS[1]) == 0 then return {1, ''} end
if (redis.call('HGET', KEYS[1], 'deleted_at') or '') ~= '' then return {2, ''} end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fields = {}
for i = 5, #ARGV, 2 do
  fields[ARGV[i]] = ARGV[i + 1]
end
local expires = fields['expires_at']
if ARGV[2] ~= '' then
  expires = string.format('%.0f', now + tonumber(ARGV[2]) * 1000000)
elseif ARGV[3] ~= '' then
  local current = tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '') or now
  expires = string.format('%.0f', math.max(current, now) + tonumber(ARGV[3]) * 1000000)
end
local LATEST = 253402214400000000 -- 9999-12-31T00:00:00Z in microseconds
if expires ~= nil and expires ~= '' then
  if tonumber(expires) <= now then return {3, ''} end
  if tonumber(expires) > LATEST then return {4, ''} end
end

local was = redis.call('HMGET', KEYS[1], 'active', 'id', 'account_id')
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local alert_cap = tonumber(ARGV[4]) or 0
if alert_cap > 0 and was[1] == '1' and fields['active'] == '0' then
  if redis.call('XLEN', KEYS[3]) >= alert_cap then
    redis.call('HINCRBY', KEYS[2], 'alerts_dropped',
      redis.call('XTRIM', KEYS[3], 'MAXLEN', alert_cap - 1))
  end
  redis.call('XADD', KEYS[3], '*', 'account_id', was[3] or '', 'key_id', was[2] or '',
    'created_at', string.format('%.0f', now), 'type', 'key.deactivated')
end
if expires ~= nil then redis.call('HSET', KEYS[1], 'expires_at', expires) end
if ARGV[1] == '1' then
  local duration = tonumber(redis.call('HGET', KEYS[1], 'budget_duration'))
  redis.call('HSET', KEYS[1], 'resets_at', string.format('%.0f', now + duration * 1000000))
end
return {0, redis.call('HGET', KEYS[1], 'expires_at') or ''}
