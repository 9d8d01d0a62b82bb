-- Read a key's budget, limits and account balance for GET /v1/usage, applying the lazy
-- budget rollover so the reported period is current. Does not touch any bucket.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = account record hash    gw:{acct:<id>}:account
-- ARGV[1] = SHA-256 of the presented secret (hex)
-- ARGV[2...] = the plans' budget windows, in pairs: slug, windows (as in admit.lua), for
--           the plans that have some
-- returns {code, now_us, name, type, plan, created_at, expires_at, rpm, tpm,
--          budget_limit, budget_duration, spent, resets_at, credits, windows}
--   windows: the key's budget windows beyond the primary one (its own, else its plan's)
--   then the account's, flat: scope ('key' or 'account'), limit_micro, seconds, mode,
--   spent, resets_at ('' before first use), ... as stored: the caller applies a rollover
--   that is due (Redis time now_us) to what it shows
--   code (UsageCode in gateway/store/codes.py): 0 ok, 1 secret does not match,
--         2 deactivated, 4 record gone

local function fmt(x) return string.format('%.0f', x) end

local rec = redis.call('HMGET', KEYS[1], 'hash', 'active', 'name', 'type', 'plan',
  'created_at', 'expires_at', 'rpm', 'tpm', 'budget_limit', 'budget_duration', 'spent',
  'resets_at', 'windows')
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
local acct = redis.call('HMGET', KEYS[2], 'credits', 'windows')
local key_windows = rec[14]
if not key_windows or key_windows == '' then
  key_windows = ''
  for i = 2, #ARGV - 1, 2 do
    if ARGV[i] == rec[5] then key_windows = ARGV[i + 1] end
  end
end
local windows = {}
local function add(spec, hash, scope)
  for limit, seconds, mode in string.gmatch(spec or '', '(%d+):(%d+):(%a)') do
    local field = 'bw:' .. seconds .. mode
    local state = redis.call('HMGET', hash, field .. ':s', field .. ':r')
    for _, v in ipairs({scope, limit, seconds, mode, state[1] or '0', state[2] or ''}) do
      windows[#windows + 1] = v
    end
  end
end
add(key_windows, KEYS[1], 'key')
add(acct[2], KEYS[2], 'account')
return {0, fmt(now), rec[3], rec[4], rec[5], rec[6], rec[7], rec[8], rec[9], rec[10],
        rec[11], fmt(spent), fmt(resets_at), acct[1] or '0', windows}
