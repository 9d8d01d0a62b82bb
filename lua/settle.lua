-- Settlement: replace the admission-time estimate with the actual usage. Idempotent:
-- the reservation is deleted here, so a repeated call for the same request is a no-op.
-- Each redis.call costs microseconds of its own: the key record is read once and written
-- once, and each usage hash is read once and written once.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = account record hash    gw:{acct:<id>}:account
-- KEYS[3] = reservation            gw:{acct:<id>}:res:<request_id>  (see admit.lua)
-- KEYS[4] = usage counter prefix   gw:{acct:<id>}:usage:<key_id>  (same slot; suffixed below)
-- ARGV[1] = actual prompt tokens
-- ARGV[2] = actual completion tokens
-- ARGV[3] = actual cost, integer micro-USD
-- ARGV[4] = 1 to add the request to the usage counters, 0 for a refund of an admission
--           whose reply was lost (the client never got an answer from the upstream)
-- returns 1 when settled now, 0 when the reservation was already settled or had expired

local reservation = redis.call('GET', KEYS[3])
if not reservation then return 0 end
redis.call('DEL', KEYS[3])
-- The fifth number, the tpm the admission used (a key may follow its plan's), is absent
-- from reservations made before it was added: then the record's tpm serves.
local tokens, budget, credits, period, admitted_tpm = string.match(reservation,
  '^(%d+) (%d+) (%d+) (%d+) ?(%d*)$')
tokens, budget, credits = tonumber(tokens), tonumber(budget), tonumber(credits)

-- Numbers go to redis.call as they are (written exactly below 1e17; see admit.lua).
local prompt, completion, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local rec = redis.call('HMGET', KEYS[1], 'type', 'tpm', 'tpm_tat', 'resets_at', 'spent',
  'total_spent')
if rec[1] then
  local tat = tonumber(rec[3]) or 0
  local delta = prompt + completion - tokens
  local tpm = tonumber(admitted_tpm) or tonumber(rec[2])
  if delta ~= 0 and tpm then tat = tat + delta * 60000000 / tpm end
  local spent = tonumber(rec[5])
  -- A request that straddles a rollover is charged to the period that admitted it.
  if period == rec[4] then spent = spent + cost - budget end
  redis.call('HSET', KEYS[1], 'tpm_tat', tat, 'spent', spent,
    'total_spent', (tonumber(rec[6]) or 0) + cost)
end
-- Credits are the account's: corrected even if the key record has gone meanwhile.
if rec[1] == 'credit' or credits > 0 then
  redis.call('HINCRBY', KEYS[2], 'credits', credits - cost)
end
redis.call('HINCRBY', KEYS[2], 'total_spent', cost)
if ARGV[4] == '0' then return 1 end

-- Usage counters: per-minute fields in one hash per hour (kept 2 hours) and per-hour
-- fields in one hash per day (kept 32 days). Bounded: they expire by themselves.
local t = redis.call('TIME')
local minute = math.floor(tonumber(t[1]) / 60)
local hour = math.floor(minute / 60)
local day = math.floor(hour / 24)

local function count(key, slot, ttl)
  local r, p, c = 'r' .. slot, 'p' .. slot, 'c' .. slot
  local old = redis.call('HMGET', key, r, p, c)
  redis.call('HSET', key, r, (tonumber(old[1]) or 0) + 1, p, (tonumber(old[2]) or 0) + prompt,
    c, (tonumber(old[3]) or 0) + completion)
  -- The time to live is set by the first request of each minute (hour), not by every one.
  if not old[1] then redis.call('EXPIRE', key, ttl) end
end

count(KEYS[4] .. ':m:' .. hour, tostring(minute % 60), 7200)
count(KEYS[4] .. ':h:' .. day, tostring(hour % 24), 2764800)
return 1
