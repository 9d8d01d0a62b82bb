-- Read a key's budget, limits and account balance for GET /v1/usage, applying the lazy
-- budget rollover so the reported period is current. Does not touch any bucket.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = account record hash    gw:{acct:<id>}:account
-- ARGV[1] = SHA-256 of the presented secret (hex)
-- returns {code, now_us, name, type, plan, created_at, expires_at, rpm, tpm,
--          budget_limit, budget_duration, spent, resets_at, credits}
--   code (UsageCode in gateway/store/codes.py): 0 ok, 1 secret does not match,
--         2 deactivated, 4 record gone

local function fmt(x) return string.format('%.0f', x) end

local rec = redis.call('HMGET', KEYS[1], 'hash', 'active', 'name', 'type', 'plan',
  'created_at', 'expires_at', 'rpm', 'tpm', 'budget_limit', 'budget_duration', 'spent',
  'resets_at')
if not rec[1] then
  if rec[2] then return {1} end -- a deleted key: its record stays, its secret matches nothing
  return {4}
end
if rec[1] ~= ARGV[1] then return {1} end
if rec[2] ~= '1' then return {2} end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local spent = tonumber(rec[12])
local resets_at = tonumber(rec[13])
local duration = tonumber(rec[11]) * 1000000
if now >= resets_at then
  resets_at = resets_at + (math.floor((now - resets_at) / duration) + 1) * duration
  spent = 0
  redis.call('HSET', KEYS[1], 'spent', 0, 'resets_at', fmt(resets_at))
end
local credits = redis.call('HGET', KEYS[2], 'credits') or '0'
return {0, fmt(now), rec[3], rec[4], rec[5], rec[6], rec[7], rec[8], rec[9], rec[10],
        rec[11], fmt(spent), fmt(resets_at), credits}
