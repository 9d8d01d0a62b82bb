-- Admission: authenticate, roll the budget period over, check RPM/TPM buckets,
-- budget and credits, then reserve the estimate. All or nothing, one round trip.
-- Each redis.call costs microseconds of its own: the key record is read once and written
-- once, and the reservation is one SET with its expiry.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = account record hash    gw:{acct:<id>}:account
-- KEYS[3] = reservation            gw:{acct:<id>}:res:<request_id>
--           a string "<tokens> <budget> <credits> <period> <tpm> <admitted_us>", read back
--           by settle.lua (admitted_us: this admission's Redis time, for the ledger),
--           followed by " <slots> <account_tpm> <model_tpm> <windows> <model>" when the
--           request took a slot, met an account or model token bucket or a budget window
--           (slots: 1 the key's, 2 the account's, 3 both; windows: '-' none, else entries
--           '<k|a><field>@<resets>:<limit>' joined by ';', the windows charged, in the key's
--           (k) or the account's (a) record, the period each was charged to and its limit)
-- KEYS[4] = the key's slots        gw:{acct:<id>}:slots:<key_id>
-- KEYS[5] = the account's slots    gw:{acct:<id>}:slots
--           sorted sets of the reservations in flight (members: KEYS[3]) by lease expiry
--           (Redis time, microseconds); an expired member is a dead process's and is freed
-- KEYS[6] = usage counter prefix   gw:{acct:<id>}:usage:<key_id> (see settle.lua): a
--           refusal (codes 2..10) adds one to the field 'x<minute>' of its ':m:<hour>' hash,
--           except a refusal for RPM, TPM or a slot (4, 5, 10) on a plan that queues (its
--           enforce 'q' suffix): the caller may still admit that request after a wait, and
--           counts it (lua/refused.lua) when it is refused in the end
-- ARGV[1] = SHA-256 of the presented secret (hex)
-- ARGV[2] = prompt tokens, an upper bound
-- ARGV[3] = completion tokens one sequence may generate (the bound asked for)
-- ARGV[4] = sequences (choices x prompts)
-- ARGV[5] = cost of the whole bound, integer micro-USD
-- ARGV[6] = cost of the prompt alone, integer micro-USD (rounded up)
-- ARGV[7] = output price, micro-USD per million tokens
-- ARGV[8] = reservation time to live, seconds
-- ARGV[9] = 'clamp' to lower the bound to what the budget and credits can pay,
--           'reject' to refuse a request they cannot pay in full
-- ARGV[10] = the model the request asks for; '\1' when an inference request names none
--           (only a '*' pattern allows it); '' for a keyed request that is not inference
--           (no model to check)
-- ARGV[11] = a slot's lease, microseconds (renewed while the request lives)
-- ARGV[12...] = the plans, in eights: slug, rpm, tpm, models, max_concurrent, enforce,
--           model_limit, windows (slug '' for credit keys; models: names or 'prefix*'
--           patterns joined by commas, '' for any model; max_concurrent 0 for none; enforce
--           '0' for shadow mode, '1' to enforce, either followed by 'q' when the plan
--           queues; model_limit "<rpm> <tpm>" for the model asked, '' for none;
--           windows: budget windows "<limit_micro>:<seconds>:<r|c>" joined by commas, r
--           rolling from first use, c aligned to UTC (30 or 31 days: calendar months)).
--           A key without its own rpm, tpm, models, max_concurrent or windows (the field
--           empty) follows its plan's here, so a plan edited in the config reaches every
--           key on it. The account record's own rpm, tpm, max_concurrent and windows
--           (absent: none) apply to all its keys together. A window's state is two fields
--           of the record that holds it: 'bw:<seconds><r|c>:s' spent, ':r' resets_at.
-- returns {code, rpm_limit, rpm_remaining, rpm_reset_us, tpm_limit, tpm_remaining,
--          tpm_reset_us, retry_after_us, plan, key_type, per_sequence, slots, would_reject,
--          scope}
--   the rpm_* and tpm_* of the tightest bucket (the fewest remaining) of the key's, the
--   model's and the account's
--   code (AdmitCode in gateway/store/codes.py): 0 admitted, 1 unknown key, 2 deactivated,
--         3 subscription expired, 4 rpm exhausted, 5 tpm exhausted, 6 budget exhausted,
--         7 credits exhausted, 8 plan unknown (not among ARGV[11...]),
--         9 model not allowed (ARGV[10] matches none of the key's or its plan's models),
--         10 concurrency limit (max_concurrent requests of the key or account in flight)
--   slots: the slots this admission took (as in the reservation), to renew while it lives
--   would_reject: in shadow mode (the plan's enforce '0'), the code the plan's limits would
--         have refused with (4, 5, 9 or 10), the request admitted without taking any of
--         the buckets or slots it would have been refused for; else 0
--   scope: which limit the rpm/tpm/concurrency refusal (or would_reject) is: 'key',
--         'model' or 'account'
--   retry_after_us is -1 when no wait helps.
--   per_sequence: the completion bound admitted (ARGV[3], or less when clamped); the
--   caller writes it into the forwarded request, so the upstream cannot generate more.

local WINDOW = 60000000 -- token buckets refill completely in one minute (microseconds)

-- Numbers go to redis.call as they are: Redis writes integers below 1e17 exactly, which
-- covers microsecond timestamps and micro-USD (string.format costs ~1 us a call here).

local rec = redis.call('HMGET', KEYS[1], 'hash', 'active', 'type', 'plan', 'expires_at',
  'rpm', 'tpm', 'rpm_tat', 'tpm_tat', 'budget_limit', 'budget_duration', 'spent', 'resets_at',
  'rpm_rate', 'tpm_rate', 'models', 'max_concurrent', 'windows')
if not rec[1] or rec[1] ~= ARGV[1] then
  return {1, 0, 0, 0, 0, 0, 0, -1, '', '', 0, 0, 0, ''}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local prompt_tokens = tonumber(ARGV[2])
local per_sequence = tonumber(ARGV[3])
local sequences = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local key_type, plan = rec[3], rec[4]

-- Refusals per key and minute, for the operator's view of the keys refused most (the
-- hash expires with the minute counters settle.lua keeps beside them).
local queues = false
local function count_refusal(code)
  if queues and (code == 4 or code == 5 or code == 10) then return end
  local minute = math.floor(tonumber(t[1]) / 60)
  local hash = KEYS[6] .. ':m:' .. math.floor(minute / 60)
  if redis.call('HINCRBY', hash, 'x' .. (minute % 60), 1) == 1 then
    redis.call('EXPIRE', hash, 7200)
  end
end
local rpm, tpm = tonumber(rec[6]), tonumber(rec[7])
local models = rec[16]
if models == '' then models = false end
local max_concurrent = tonumber(rec[17])
local enforce, model_limit = true, ''
local key_windows = rec[18]
if key_windows == '' then key_windows = false end
for i = 12, #ARGV - 7, 8 do
  if ARGV[i] == plan then
    rpm, tpm = rpm or tonumber(ARGV[i + 1]), tpm or tonumber(ARGV[i + 2])
    models = models or ARGV[i + 3]
    max_concurrent = max_concurrent or tonumber(ARGV[i + 4])
    enforce, model_limit = string.byte(ARGV[i + 5]) ~= 48, ARGV[i + 6]  -- '0...'
    queues = #ARGV[i + 5] > 1
    key_windows = key_windows or ARGV[i + 7]
    break
  end
end
if not rpm or not tpm then
  count_refusal(8)
  return {8, 0, 0, 0, 0, 0, 0, -1, plan, key_type, 0, 0, 0, ''}
end
local acct = redis.call('HMGET', KEYS[2], 'credits', 'rpm', 'tpm', 'rpm_tat', 'tpm_tat',
  'rpm_rate', 'tpm_rate', 'max_concurrent', 'windows', 'credits_reserved')

-- Generic cell rate algorithm: a bucket is one "theoretical arrival time" (tat). A bucket's
-- debt (tat - now) was run up at the rate it was written with: under a new limit (an
-- update, a plan edited) the same share of the bucket stays used, so a raised limit gives
-- room at once and a lowered one takes it away at once.
local function bucket(scope, limit, tat, rate)
  tat = math.max(tonumber(tat) or 0, now)
  rate = tonumber(rate) or limit
  if rate ~= limit then tat = now + (tat - now) * rate / limit end
  -- `next` given here: a field added later would make Lua grow the table
  return {scope = scope, limit = limit, tat = tat, interval = WINDOW / limit, next = tat}
end
local function remaining(b)
  -- 1e-3: microsecond timestamps near 1.7e15 carry a quarter-microsecond of float error
  return math.max(0, math.floor((now + WINDOW - b.tat) / b.interval + 1e-3))
end

local requests = {bucket('key', rpm, rec[8], rec[14])}
local tokens = {bucket('key', tpm, rec[9], rec[15])}
local model_field
if model_limit ~= '' then
  local mrpm, mtpm = string.match(model_limit, '^(%d+) (%d+)$')
  model_field = 'm:' .. ARGV[10] .. ':'
  local m = redis.call('HMGET', KEYS[1], model_field .. 'rpm_tat', model_field .. 'tpm_tat')
  requests[#requests + 1] = bucket('model', tonumber(mrpm), m[1], nil)
  tokens[#tokens + 1] = bucket('model', tonumber(mtpm), m[2], nil)
end
local account_rpm, account_tpm = tonumber(acct[2]), tonumber(acct[3])
if account_rpm then requests[#requests + 1] = bucket('account', account_rpm, acct[4], acct[6]) end
if account_tpm then tokens[#tokens + 1] = bucket('account', account_tpm, acct[5], acct[7]) end

local function tightest(list)
  local best, fewest = list[1], remaining(list[1])
  for i = 2, #list do
    local left = remaining(list[i])
    if left < fewest then best, fewest = list[i], left end
  end
  return best, fewest
end

local function reply(code, retry, slots, would, scope)
  if code ~= 0 then count_refusal(code) end
  local r, r_left = tightest(requests)
  local k, k_left = tightest(tokens)
  -- Numbers in a reply become integers on their own (string.format costs ~1 us a call).
  return {code, r.limit, r_left, r.tat - now, k.limit, k_left, k.tat - now, retry, plan,
          key_type, per_sequence, slots or 0, would or 0, scope or ''}
end

if rec[2] ~= '1' then return reply(2, -1) end
if key_type == 'subscription' and rec[5] ~= '' and now >= tonumber(rec[5]) then
  return reply(3, -1)
end

-- A limit of the plan refused: with enforce, the request is; in shadow mode it is admitted
-- without taking what it was refused for, and the refusal is reported.
local would, would_scope = 0, ''

-- The models the key (or its plan) allows: exact names or 'prefix*'; none listed, any.
if models and models ~= '' and ARGV[10] ~= '' then
  local asked, allowed = ARGV[10], false
  for pattern in string.gmatch(models, '[^,]+') do
    if string.byte(pattern, -1) == 42 then  -- '*'
      allowed = string.sub(asked, 1, #pattern - 1) == string.sub(pattern, 1, -2)
    else
      allowed = asked == pattern
    end
    if allowed then break end
  end
  if not allowed then
    if enforce then return reply(9, -1) end
    would, would_scope = 9, 'key'
  end
end

-- Lazy, exact budget rollover: advance resets_at by whole durations from its anchor.
local spent = tonumber(rec[12])
local resets_at = tonumber(rec[13])
local duration = tonumber(rec[11]) * 1000000
local rolled = false
if now >= resets_at then
  resets_at = resets_at + (math.floor((now - resets_at) / duration) + 1) * duration
  spent = 0
  rolled = true
end

-- A refusal still records the rollover; an admission writes it with the rest.
local function refuse(code, retry, scope)
  if rolled then redis.call('HSET', KEYS[1], 'spent', 0, 'resets_at', resets_at) end
  return reply(code, retry, 0, 0, scope)
end

-- What the budget and the credits can still pay, whichever is less (nil: no limit).
local affordable, short, short_retry = nil, 0, -1
if rec[10] ~= '' then
  affordable = tonumber(rec[10]) - spent
  short, short_retry = 6, resets_at - now
  if affordable <= 0 then return refuse(6, short_retry) end
end

-- Budget windows beyond the primary one: the key's (or its plan's) and the account's,
-- each with its own lazy rollover. Calendar windows end on the UTC grid of their length
-- (a 30 or 31 day one on the 1st of the month); rolling ones run from their first use.
local windows = {}
-- (only built when there are windows: these closures cost microseconds a call otherwise)
if (key_windows and key_windows ~= '') or (acct[9] and acct[9] ~= '') then
  local DAY = 86400000000
  local function month_after(day)  -- the day number of the 1st of the month after `day`
    -- civil_from_days and days_from_civil (H. Hinnant), proleptic Gregorian, UTC
    local z = day + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
      - math.floor(doe / 146096)) / 365)
    local y = yoe + era * 400
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local m = mp < 10 and mp + 3 or mp - 9
    if m <= 2 then y = y + 1 end
    m = m + 1
    if m > 12 then m, y = 1, y + 1 end
    if m <= 2 then y = y - 1 end
    era = math.floor(y / 400)
    yoe = y - era * 400
    mp = m > 2 and m - 3 or m + 9
    doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100)
      + math.floor((153 * mp + 2) / 5)
    return era * 146097 + doe - 719468
  end
  local function add_windows(spec, hash, where)
    if not spec or spec == '' then return end
    for limit, seconds, mode in string.gmatch(spec, '(%d+):(%d+):(%a)') do
      local field = 'bw:' .. seconds .. mode
      local state = redis.call('HMGET', hash, field .. ':s', field .. ':r')
      local length = tonumber(seconds) * 1000000
      local w_resets, w_spent = tonumber(state[2]), tonumber(state[1]) or 0
      if not w_resets or now >= w_resets then
        w_spent = 0
        if mode == 'c' and (length == 30 * DAY or length == 31 * DAY) then
          w_resets = month_after(math.floor(now / DAY)) * DAY
        elseif mode == 'c' then
          w_resets = (math.floor(now / length) + 1) * length
        elseif not w_resets then
          w_resets = now + length
        else
          w_resets = w_resets + (math.floor((now - w_resets) / length) + 1) * length
        end
      end
      windows[#windows + 1] = {hash = hash, where = where, field = field,
                               limit = tonumber(limit), spent = w_spent, resets = w_resets}
    end
  end
  add_windows(key_windows, KEYS[1], 'k')
  add_windows(acct[9], KEYS[2], 'a')
end
for _, w in ipairs(windows) do
  local left = w.limit - w.spent
  if left <= 0 then return refuse(6, w.resets - now) end
  if affordable == nil or left < affordable then
    affordable, short, short_retry = left, 6, w.resets - now
  end
end
if key_type == 'credit' then
  local balance = tonumber(acct[1] or '0')
  if balance <= 0 then return refuse(7, -1) end
  if affordable == nil or balance < affordable then
    affordable, short, short_retry = balance, 7, -1
  end
end

-- Never admit more than can be paid: lower the bound to the largest that fits (the caller
-- forwards that bound), or refuse when not even the prompt and one token fit.
if affordable ~= nil and cost > affordable then
  local prompt_cost, out_price = tonumber(ARGV[6]), tonumber(ARGV[7])
  if ARGV[9] ~= 'clamp' or per_sequence == 0 or prompt_cost >= affordable then
    return refuse(short, short_retry)
  end
  local fit = math.floor((affordable - prompt_cost) * 1000000 / (out_price * sequences))
  per_sequence = math.min(per_sequence, fit)
  cost = prompt_cost + math.ceil(per_sequence * sequences * out_price / 1000000)
  while cost > affordable and per_sequence > 0 do  -- float rounding: at most a step or two
    per_sequence = per_sequence - 1
    cost = prompt_cost + math.ceil(per_sequence * sequences * out_price / 1000000)
  end
  if per_sequence < 1 then return refuse(short, short_retry) end
end
local est_tokens = prompt_tokens + per_sequence * sequences

-- The cost is debited from spent even without a budget limit: should its settlement be
-- lost, the reservation stands and the operator is never under-billed.
local reserve_credits = 0
if key_type == 'credit' then reserve_credits = cost end

-- The limits, key's first: each bucket takes one request (its rpm) or the estimate (tpm).
-- The account's limits are the operator's for the account, enforced even in shadow mode.
local function over(code, retry, scope)
  if enforce or scope == 'account' then return refuse(code, retry, scope) end
  if would == 0 then would, would_scope = code, scope end
  return nil
end
for _, b in ipairs(requests) do
  b.next = b.tat + b.interval
  if b.next - WINDOW > now + 1e-3 then
    local r = over(4, b.next - WINDOW - now, b.scope)
    if r then return r end
  end
end
-- A request larger than the whole bucket is admitted once the bucket is full and leaves
-- it in debt; later requests wait the debt out.
for _, b in ipairs(tokens) do
  b.next = b.tat + est_tokens * b.interval
  if b.next - WINDOW > now + 1e-3 and b.tat > now then
    local wait = b.next - WINDOW - now
    if est_tokens * b.interval > WINDOW then wait = b.tat - now end
    local r = over(5, wait, b.scope)
    if r then return r end
  end
end

-- Requests in flight: members past their lease belong to a process that died.
local slots = 0
local account_max = tonumber(acct[8])
if ARGV[10] ~= '' then
  if max_concurrent and max_concurrent > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
    if redis.call('ZCARD', KEYS[4]) >= max_concurrent then
      local r = over(10, 1000000, 'key')
      if r then return r end
    else
      slots = 1
    end
  end
  if account_max and account_max > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
    if redis.call('ZCARD', KEYS[5]) >= account_max then
      return refuse(10, 1000000, 'account')
    end
    slots = slots + 2
  end
end
-- Shadow mode: a request the plan would have refused takes none of the plan's buckets or
-- slots, so the counts go on as if it had been refused.
if would ~= 0 then
  requests[1].next, tokens[1].next = requests[1].tat, tokens[1].tat
  if model_field then requests[2].next, tokens[2].next = requests[2].tat, tokens[2].tat end
  if slots % 2 == 1 then slots = slots - 1 end
end

redis.call('HSET', KEYS[1], 'rpm_tat', requests[1].next, 'tpm_tat', tokens[1].next,
  'rpm_rate', rpm, 'tpm_rate', tpm,
  'spent', spent + cost, 'resets_at', resets_at)
local model_tpm = 0
if model_field then
  model_tpm = tokens[2].limit
  redis.call('HSET', KEYS[1], model_field .. 'rpm_tat', requests[2].next,
    model_field .. 'tpm_tat', tokens[2].next)
end
if account_rpm or account_tpm then
  local a = {}
  for _, b in ipairs(requests) do
    if b.scope == 'account' then a = {'rpm_tat', b.next, 'rpm_rate', b.limit} end
  end
  for _, b in ipairs(tokens) do
    if b.scope == 'account' then
      a[#a + 1], a[#a + 2], a[#a + 3], a[#a + 4] = 'tpm_tat', b.next, 'tpm_rate', b.limit
    end
  end
  redis.call('HSET', KEYS[2], unpack(a))
end
if reserve_credits > 0 then
  -- credits_reserved: what requests in flight hold of the balance (settle.lua gives it back),
  -- so an alert can judge the balance they will leave rather than their estimates.
  redis.call('HSET', KEYS[2], 'credits', (tonumber(acct[1]) or 0) - reserve_credits,
    'credits_reserved', (tonumber(acct[10]) or 0) + reserve_credits)
end
local charged = '-'
if #windows > 0 then
  local entries = {}
  for _, w in ipairs(windows) do
    redis.call('HSET', w.hash, w.field .. ':s', w.spent + cost, w.field .. ':r', w.resets)
    entries[#entries + 1] = string.format('%s%s@%.0f:%.0f', w.where, w.field, w.resets,
      w.limit)
  end
  charged = table.concat(entries, ';')
end
local lease_end = now + tonumber(ARGV[11])
if slots % 2 == 1 then redis.call('ZADD', KEYS[4], lease_end, KEYS[3]) end
if slots >= 2 then redis.call('ZADD', KEYS[5], lease_end, KEYS[3]) end
local reservation
if slots == 0 and not account_tpm and model_tpm == 0 and charged == '-' then
  reservation = string.format('%.0f %.0f %.0f %.0f %.0f %.0f', est_tokens, cost,
    reserve_credits, resets_at, tpm, now)
else
  reservation = string.format('%.0f %.0f %.0f %.0f %.0f %.0f %d %.0f %.0f %s %s', est_tokens,
    cost, reserve_credits, resets_at, tpm, now, slots, account_tpm or 0, model_tpm, charged,
    model_tpm > 0 and ARGV[10] or '')  -- the name only for its bucket: it is the client's
end
redis.call('SET', KEYS[3], reservation, 'EX', ARGV[8])
for _, b in ipairs(requests) do b.tat = b.next end
for _, b in ipairs(tokens) do b.tat = b.next end
return reply(0, 0, slots, would, would_scope)
