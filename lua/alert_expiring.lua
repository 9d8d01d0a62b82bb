-- key.expiring: one event per key and expiry, when Redis time is within ARGV[2] seconds of
-- the key's expires_at (and before it). Run by the alert sender's periodic pass for each
-- account, over the keys of its key set, in batches.
-- Marker: the key record's alert_expiring = the expires_at it fired for (a renewed key,
-- with a new expiry, fires again when that one comes close).
--
-- KEYS[1] = account record hash           gw:{acct:<id>}:account
-- KEYS[2] = the account's alert outbox    gw:{acct:<id>}:alerts, a stream
-- KEYS[3...] = key record hashes          gw:{acct:<id>}:key:<key_id>
-- ARGV[1] = the outbox's cap, events per account (the oldest trimmed beyond it, counted in
--           the account's alerts_dropped)
-- ARGV[2] = the window, seconds (expiring_within)
-- ARGV[3] = account id
-- returns the number of events written

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cap = tonumber(ARGV[1])
local window = tonumber(ARGV[2]) * 1000000
local written = 0
for i = 3, #KEYS do
  local r = redis.call('HMGET', KEYS[i], 'id', 'expires_at', 'active', 'deleted_at',
    'alert_expiring')
  local expires = tonumber(r[2] or '')
  if r[1] and expires and r[3] == '1' and (r[4] or '') == '' and expires > now
      and expires - now <= window and r[5] ~= r[2] then
    redis.call('HSET', KEYS[i], 'alert_expiring', r[2])
    if redis.call('XLEN', KEYS[2]) >= cap then
      redis.call('HINCRBY', KEYS[1], 'alerts_dropped',
        redis.call('XTRIM', KEYS[2], 'MAXLEN', cap - 1))
    end
    redis.call('XADD', KEYS[2], '*', 'account_id', ARGV[3], 'key_id', r[1],
      'created_at', string.format('%.0f', now), 'type', 'key.expiring', 'expires_at', r[2])
    written = written + 1
  end
end
return written
