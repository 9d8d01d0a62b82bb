-- Settlement: replace the admission-time estimate with the actual usage. Idempotent:
-- the reservation is deleted here, so a repeated call for the same request is a no-op.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = account record hash    gw:{acct:<id>}:account
-- KEYS[3] = reservation hash       gw:{acct:<id>}:res:<request_id>
-- KEYS[4] = usage counter prefix   gw:{acct:<id>}:usage:<key_id>  (same slot; suffixed below)
-- ARGV[1] = actual prompt tokens
-- ARGV[2] = actual completion tokens
-- ARGV[3] = actual cost, integer micro-USD
-- ARGV[4] = 1 to add the request to the usage counters, 0 for a refund of an admission
--           whose reply was lost (the client never got an answer from the upstream)
-- returns 1 when settled now, 0 when the reservation was already settled or had expired

local res = redis.call('HMGET', KEYS[3], 'tokens', 'budget', 'credits', 'period')
if not res[1] then return 0 end
redis.call('DEL', KEYS[3])

local function fmt(x) return string.format('%.0f', x) end
local prompt, completion, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local rec = redis.call('HMGET', KEYS[1], 'type', 'tpm', 'tpm_tat', 'resets_at')
if rec[2] then
  local delta = prompt + completion - tonumber(res[1])
  if delta ~= 0 then
    local tat = tonumber(rec[3]) + delta * 60000000 / tonumber(rec[2])
    redis.call('HSET', KEYS[1], 'tpm_tat', fmt(tat))
  end
  -- A request that straddles a rollover is charged to the period that admitted it.
  if res[4] == rec[4] then
    redis.call('HINCRBY', KEYS[1], 'spent', cost - tonumber(res[2]))
  end
  redis.call('HINCRBY', KEYS[1], 'total_spent', cost)
end
-- Credits are the account's: corrected even if the key record has gone meanwhile.
if rec[1] == 'credit' or tonumber(res[3]) > 0 then
  redis.call('HINCRBY', KEYS[2], 'credits', tonumber(res[3]) - cost)
end
redis.call('HINCRBY', KEYS[2], 'total_spent', cost)
if ARGV[4] == '0' then return 1 end

-- Usage counters: per-minute fields in one hash per hour (kept 2 hours) and per-hour
-- fields in one hash per day (kept 32 days). Bounded: they expire by themselves.
local t = redis.call('TIME')
local minute = math.floor(tonumber(t[1]) / 60)
local hour = math.floor(minute / 60)
local day = math.floor(hour / 24)
local mkey = KEYS[4] .. ':m:' .. hour
local hkey = KEYS[4] .. ':h:' .. day
local m, h = tostring(minute % 60), tostring(hour % 24)
-- The time to live is renewed by the first request of each minute (hour), not by every one.
local first_in_minute = redis.call('HINCRBY', mkey, 'r' .. m, 1) == 1
redis.call('HINCRBY', mkey, 'p' .. m, prompt)
redis.call('HINCRBY', mkey, 'c' .. m, completion)
if first_in_minute then redis.call('EXPIRE', mkey, 7200) end
local first_in_hour = redis.call('HINCRBY', hkey, 'r' .. h, 1) == 1
redis.call('HINCRBY', hkey, 'p' .. h, prompt)
redis.call('HINCRBY', hkey, 'c' .. h, completion)
if first_in_hour then redis.call('EXPIRE', hkey, 2764800) end
return 1
