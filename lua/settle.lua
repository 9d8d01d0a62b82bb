-- Settlement: replace the admission-time estimate with the actual usage. Idempotent:
-- the reservation is deleted here, so a repeated call for the same request is a no-op.
-- Each redis.call costs microseconds of its own: the key record is read once and written
-- once, and each usage hash is read once and written once.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = account record hash    gw:{acct:<id>}:account
-- KEYS[3] = reservation            gw:{acct:<id>}:res:<request_id>  (see admit.lua)
-- KEYS[4] = usage counter prefix   gw:{acct:<id>}:usage:<key_id>  (same slot; suffixed below)
-- KEYS[5] = the account's ledger   gw:{acct:<id>}:ledger, a stream (only with ARGV[5] > 0)
-- KEYS[6] = the key's slots        gw:{acct:<id>}:slots:<key_id>, requests in flight
-- KEYS[7] = the account's slots    gw:{acct:<id>}:slots  (both: sorted sets, see admit.lua)
-- KEYS[8] = the account's alert outbox  gw:{acct:<id>}:alerts, a stream
-- ARGV[1] = actual prompt tokens
-- ARGV[2] = actual completion tokens
-- ARGV[3] = actual cost, integer micro-USD
-- ARGV[4] = 1 to add the request to the usage counters, 0 for a refund of an admission
--           whose reply was lost (the client never got an answer from the upstream)
-- ARGV[5] = the ledger's cap, entries per account (absent or 0: no ledger entry). The entry
--           is appended here, with the counters, so a settlement and its record exist
--           together or not at all; the reservation makes a replay append nothing.
-- ARGV[6..12] = the entry's request id, key id, account id, route, model served,
--           cached prompt tokens, upstream status (0: no answer); without a ledger only
--           ARGV[10], the model served, for the counters' spend by model (below)
-- ARGV[13...] = alerts (absent: none; then ARGV[5..12] are the ledger's, "off" without
--           one): see the `-- alerts:` block below
-- returns 1 when settled now, 0 when the reservation was already settled or had expired

local reservation = redis.call('GET', KEYS[3])
if not reservation then return 0 end
redis.call('DEL', KEYS[3])
-- The fifth number, the tpm the admission used (a key may follow its plan's), is absent
-- from reservations made before it was added: then the record's tpm serves; so are the
-- slots, account and model limits of reservations made before those.
local tokens, budget, credits, period, admitted_tpm, admitted_us, rest = string.match(
  reservation, '^(%d+) (%d+) (%d+) (%d+) ?(%d*) ?(%d*) ?(.*)$')
tokens, budget, credits = tonumber(tokens), tonumber(budget), tonumber(credits)
local slots, account_tpm, model_tpm, windows, model = string.match(rest,
  '^(%d+) (%d+) (%d+) (%S+) ?(.*)$')
slots, account_tpm, model_tpm = tonumber(slots) or 0, tonumber(account_tpm) or 0,
  tonumber(model_tpm) or 0
-- The request's slots are free again (a settlement comes at the end, on a disconnect, an
-- upstream error or a cancellation alike).
if slots % 2 == 1 then redis.call('ZREM', KEYS[6], KEYS[3]) end
if slots >= 2 then redis.call('ZREM', KEYS[7], KEYS[3]) end

-- Numbers go to redis.call as they are (written exactly below 1e17; see admit.lua).
local prompt, completion, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local rec = redis.call('HMGET', KEYS[1], 'type', 'tpm', 'tpm_tat', 'resets_at', 'spent',
  'total_spent', 'budget_limit', 'alert_budget', 'alert_settled')
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
  if model_tpm > 0 and delta ~= 0 then  -- the key's bucket for this model, as above
    local field = 'm:' .. model .. ':tpm_tat'
    local mtat = tonumber(redis.call('HGET', KEYS[1], field))
    if mtat then redis.call('HSET', KEYS[1], field, mtat + delta * 60000000 / model_tpm) end
  end
end
-- The budget windows charged at admission, each corrected if still in the same period
-- (and kept, with its spend after, for the alerts below).
local charged = {}
for where, field, resets, limit in string.gmatch(windows or '',
    '([ka])([^@;]+)@(%d+):?(%d*)') do
  local hash = KEYS[2]
  if where == 'k' then hash = KEYS[1] end
  local state = redis.call('HMGET', hash, field .. ':r', field .. ':alert',
    field .. ':settled')
  if state[1] == resets then
    if cost ~= budget then redis.call('HINCRBY', hash, field .. ':s', cost - budget) end
    charged[#charged + 1] = {hash = hash, field = field, resets = resets,
                             limit = tonumber(limit), fired = state[2], settled = state[3]}
  end
end
-- The account's token bucket, when the account has one (shared by all its keys).
local delta = prompt + completion - tokens
if account_tpm > 0 and delta ~= 0 then
  local atat = tonumber(redis.call('HGET', KEYS[2], 'tpm_tat'))
  if atat then redis.call('HSET', KEYS[2], 'tpm_tat', atat + delta * 60000000 / account_tpm) end
end
-- Credits are the account's: corrected even if the key record has gone meanwhile.
if rec[1] == 'credit' or credits > 0 then
  redis.call('HINCRBY', KEYS[2], 'credits', credits - cost)
end
if credits > 0 then redis.call('HINCRBY', KEYS[2], 'credits_reserved', -credits) end
local account_total = redis.call('HINCRBY', KEYS[2], 'total_spent', cost)
-- alerts: budget.threshold and credits.low, each created once per crossing (issue 16), in
-- this script so that concurrent settlements on any replica cannot make one twice.
-- ARGV[13] = the outbox's cap, events per account (absent or 0: no alerts)
-- ARGV[14] = account id, ARGV[15] = key id (of the event)
-- ARGV[16] = credits.low's threshold, micro-USD (-1: none)
-- ARGV[17...] = budget thresholds, parts per million of a budget window's limit, ascending
-- A threshold is judged on what settled in the period ('alert_settled' on the key record
-- and '<window field>:settled', each '<resets_at> <micro-USD>'), never on `spent`, which
-- holds the estimates of requests still in flight; credits.low likewise on the balance plus
-- credits_reserved (what those requests hold, given back as they settle).
-- Markers: the key record's alert_budget = '<resets_at> <ppm>', the highest threshold fired
-- in the budget period that ends at resets_at (a new period fires again), and the same in
-- '<window field>:alert' for every other budget window (of the key or the account); the
-- alert_credits_low = the threshold it fired at (credits.lua removes it when credits bring
-- the balance back up to it). Events go to KEYS[8]; at the cap the oldest are trimmed and
-- counted in the account's alerts_dropped.
local alert_cap = tonumber(ARGV[13]) or 0
if alert_cap > 0 then
  local events = {}
  -- One window's thresholds, each crossed once per period (its marker '<resets> <ppm>').
  local function thresholds(hash, marker_field, marker, limit, spent_now, resets, scope,
                            window)
    local fired_period, fired = string.match(marker or '', '^(%d+) (%d+)$')
    fired = (fired_period == resets and tonumber(fired)) or 0
    local top = fired
    for i = 17, #ARGV do
      local ppm = tonumber(ARGV[i])
      if ppm > fired and spent_now >= limit * ppm / 1000000 then
        events[#events + 1] = {'type', 'budget.threshold', 'threshold_ppm', ppm,
          'limit_micro', limit, 'spent_micro', spent_now, 'resets_at', resets,
          'scope', scope, 'window', window}
        top = math.max(top, ppm)
      end
    end
    if top > fired then redis.call('HSET', hash, marker_field, resets .. ' ' .. top) end
  end
  -- What settled in the period `resets`, this request's cost included, kept in `field`.
  local function settled(hash, field, value, resets)
    local in_period, sum = string.match(value or '', '^(%d+) (%d+)$')
    sum = (in_period == resets and tonumber(sum) or 0) + cost
    redis.call('HSET', hash, field, resets .. ' ' .. string.format('%.0f', sum))
    return sum
  end
  local limit = tonumber(rec[7])
  if rec[1] and period == rec[4] and #ARGV >= 17 then
    local sum = settled(KEYS[1], 'alert_settled', rec[9], rec[4])
    if limit and limit > 0 then
      thresholds(KEYS[1], 'alert_budget', rec[8], limit, sum, rec[4], 'key', 'primary')
    end
  end
  if #ARGV >= 17 then
    for _, w in ipairs(charged) do
      if w.limit then
        local scope = 'account'
        if w.hash == KEYS[1] then scope = 'key' end
        thresholds(w.hash, w.field .. ':alert', w.fired, w.limit,
          settled(w.hash, w.field .. ':settled', w.settled, w.resets), w.resets, scope, w.field)
      end
    end
  end
  local low = tonumber(ARGV[16]) or -1
  if low >= 0 and (rec[1] == 'credit' or credits > 0) then
    local acct = redis.call('HMGET', KEYS[2], 'credits', 'alert_credits_low',
      'credits_reserved')
    local balance = (tonumber(acct[1]) or 0) + math.max(0, tonumber(acct[3]) or 0)
    if balance < low and not acct[2] then
      redis.call('HSET', KEYS[2], 'alert_credits_low', low)
      events[#events + 1] = {'type', 'credits.low', 'balance_micro', balance,
        'threshold_micro', low}
    end
  end
  if #events > 0 then
    local now = redis.call('TIME')
    local created = tonumber(now[1]) * 1000000 + tonumber(now[2])
    for _, fields in ipairs(events) do
      if redis.call('XLEN', KEYS[8]) >= alert_cap then
        redis.call('HINCRBY', KEYS[2], 'alerts_dropped',
          redis.call('XTRIM', KEYS[8], 'MAXLEN', alert_cap - 1))
      end
      redis.call('XADD', KEYS[8], '*', 'account_id', ARGV[14], 'key_id', ARGV[15],
        'created_at', created, unpack(fields))
    end
  end
end
-- alerts: end
if ARGV[4] == '0' then return 1 end
local t = redis.call('TIME')

local cap = tonumber(ARGV[5]) or 0
if cap > 0 then
  -- ledger_base: the lifetime spend before the first ledger entry (a key or account that
  -- spent before the ledger was turned on); reconcile compares the ledger with the rest.
  redis.call('HSETNX', KEYS[2], 'ledger_base', account_total - cost)
  if rec[1] then redis.call('HSETNX', KEYS[1], 'ledger_base', (tonumber(rec[6]) or 0)) end
  local length = redis.call('XLEN', KEYS[5])
  if length >= cap then
    -- The exporter has been away for long: the oldest entries make room, counted with
    -- their cost, so Redis stays bounded and reconcile names what was lost.
    local dropped = redis.call('XRANGE', KEYS[5], '-', '+', 'COUNT', length - cap + 1)
    local lost = 0
    for _, entry in ipairs(dropped) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'cost_micro' then lost = lost + tonumber(fields[i + 1]) end
      end
      redis.call('XDEL', KEYS[5], entry[1])
    end
    redis.call('HINCRBY', KEYS[2], 'ledger_dropped', #dropped)
    redis.call('HINCRBY', KEYS[2], 'ledger_dropped_micro', lost)
  end
  redis.call('XADD', KEYS[5], '*', 'request_id', ARGV[6], 'key_id', ARGV[7],
    'account_id', ARGV[8], 'route', ARGV[9], 'model', ARGV[10], 'prompt_tokens', prompt,
    'cached_tokens', ARGV[11], 'completion_tokens', completion, 'cost_micro', cost,
    'status', ARGV[12], 'admitted_us', admitted_us, 'settled_us',
    tonumber(t[1]) * 1000000 + tonumber(t[2]))
end

-- Usage counters (requests, prompt and completion tokens, spend): per-minute fields in one
-- hash per hour (kept 2 hours) and per-hour fields in one hash per day (kept 32 days); the
-- day's hash also keeps the spend and requests per model served ('m:<model>', 'n:<model>',
-- ARGV[10]), at most MODELS names a key and day, the rest together as '(other)'.
-- Bounded: they expire by themselves.
local MODELS = 32
local minute = math.floor(tonumber(t[1]) / 60)
local hour = math.floor(minute / 60)
local day = math.floor(hour / 24)

local function count(key, slot, ttl, model)
  -- s: the spend, micro-USD (the dashboard's charts)
  local r, p, c, s = 'r' .. slot, 'p' .. slot, 'c' .. slot, 's' .. slot
  if not model then
    local old = redis.call('HMGET', key, r, p, c, s)
    redis.call('HSET', key, r, (tonumber(old[1]) or 0) + 1, p,
      (tonumber(old[2]) or 0) + prompt, c, (tonumber(old[3]) or 0) + completion, s,
      (tonumber(old[4]) or 0) + cost)
    -- The time to live is set by the first request of each minute (hour), not by every one.
    if not old[1] then redis.call('EXPIRE', key, ttl) end
    return
  end
  -- 'models': how many names the day's hash keeps (the bound), '(other)' not among them
  local m, n = 'm:' .. model, 'n:' .. model
  local old = redis.call('HMGET', key, r, p, c, s, m, n, 'models')
  local models = tonumber(old[7]) or 0
  if not old[5] then
    if models >= MODELS then
      m, n = 'm:(other)', 'n:(other)'
      local other = redis.call('HMGET', key, m, n)
      old[5], old[6] = other[1], other[2]
    else
      models = models + 1
    end
  end
  redis.call('HSET', key, r, (tonumber(old[1]) or 0) + 1, p, (tonumber(old[2]) or 0) + prompt,
    c, (tonumber(old[3]) or 0) + completion, s, (tonumber(old[4]) or 0) + cost,
    m, (tonumber(old[5]) or 0) + cost, n, (tonumber(old[6]) or 0) + 1, 'models', models)
  if not old[1] then redis.call('EXPIRE', key, ttl) end
end

count(KEYS[4] .. ':m:' .. hour, tostring(minute % 60), 7200)
count(KEYS[4] .. ':h:' .. day, tostring(hour % 24), 2764800, ARGV[10] or '')
return 1
