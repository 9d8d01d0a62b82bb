-- Admission: authenticate, roll the budget period over, check RPM/TPM buckets,
-- budget and credits, then reserve the estimate. All or nothing, one round trip.
-- Each redis.call costs microseconds of its own: the key record is read once and written
-- once, and the reservation is one SET with its expiry.
--
-- KEYS[1] = key record hash        gw:{acct:<id>}:key:<key_id>
-- KEYS[2] = account record hash    gw:{acct:<id>}:account
-- KEYS[3] = reservation            gw:{acct:<id>}:res:<request_id>
--           a string "<tokens> <budget> <credits> <period> <tpm> <admitted_us>", read back
--           by settle.lua (admitted_us: this admission's Redis time, for the ledger)
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
-- ARGV[11...] = the plans, in fours: slug, rpm, tpm, models (slug '' for credit keys;
--           models: names or 'prefix*' patterns joined by commas, '' for any model).
--           A key without its own rpm, tpm or models (the field empty) follows its plan's
--           here, so a plan edited in the config reaches every key on it.
-- returns {code, rpm_limit, rpm_remaining, rpm_reset_us, tpm_limit, tpm_remaining,
--          tpm_reset_us, retry_after_us, plan, key_type, per_sequence}
--   code (AdmitCode in gateway/store/codes.py): 0 admitted, 1 unknown key, 2 deactivated,
--         3 subscription expired, 4 rpm exhausted, 5 tpm exhausted, 6 budget exhausted,
--         7 credits exhausted, 8 plan unknown (not among ARGV[11...]),
--         9 model not allowed (ARGV[10] matches none of the key's or its plan's models)
--   retry_after_us is -1 when no wait helps.
--   per_sequence: the completion bound admitted (ARGV[3], or less when clamped); the
--   caller writes it into the forwarded request, so the upstream cannot generate more.

local WINDOW = 60000000 -- token buckets refill completely in one minute (microseconds)

-- Numbers go to redis.call as they are: Redis writes integers below 1e17 exactly, which
-- covers microsecond timestamps and micro-USD (string.format costs ~1 us a call here).

local rec = redis.call('HMGET', KEYS[1], 'hash', 'active', 'type', 'plan', 'expires_at',
  'rpm', 'tpm', 'rpm_tat', 'tpm_tat', 'budget_limit', 'budget_duration', 'spent', 'resets_at',
  'rpm_rate', 'tpm_rate', 'models')
if not rec[1] or rec[1] ~= ARGV[1] then
  return {1, 0, 0, 0, 0, 0, 0, -1, '', '', 0}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local prompt_tokens = tonumber(ARGV[2])
local per_sequence = tonumber(ARGV[3])
local sequences = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local key_type, plan = rec[3], rec[4]
local rpm, tpm = tonumber(rec[6]), tonumber(rec[7])
local models = rec[16]
if models == '' then models = false end
if not rpm or not tpm or not models then
  for i = 11, #ARGV - 3, 4 do
    if ARGV[i] == plan then
      rpm, tpm = rpm or tonumber(ARGV[i + 1]), tpm or tonumber(ARGV[i + 2])
      models = models or ARGV[i + 3]
      break
    end
  end
  if not rpm or not tpm then return {8, 0, 0, 0, 0, 0, 0, -1, plan, key_type, 0} end
end
local rpm_tat = math.max(tonumber(rec[8]) or 0, now)
local tpm_tat = math.max(tonumber(rec[9]) or 0, now)
-- A bucket's debt (tat - now) was run up at the rate it was written with: under a new
-- limit (an update, a plan edited) the same share of the bucket stays used, so a raised
-- limit gives room at once and a lowered one takes it away at once.
local rpm_rate, tpm_rate = tonumber(rec[14]) or rpm, tonumber(rec[15]) or tpm
if rpm_rate ~= rpm then rpm_tat = now + (rpm_tat - now) * rpm_rate / rpm end
if tpm_rate ~= tpm then tpm_tat = now + (tpm_tat - now) * tpm_rate / tpm end
local rpm_interval, tpm_interval = WINDOW / rpm, WINDOW / tpm

-- Generic cell rate algorithm: a bucket is one "theoretical arrival time".
local function remaining(tat, interval)
  -- 1e-3: microsecond timestamps near 1.7e15 carry a quarter-microsecond of float error
  return math.max(0, math.floor((now + WINDOW - tat) / interval + 1e-3))
end

local function reply(code, r_tat, t_tat, retry)
  -- Numbers in a reply become integers on their own (string.format costs ~1 us a call).
  return {code, rpm, remaining(r_tat, rpm_interval), r_tat - now,
          tpm, remaining(t_tat, tpm_interval), t_tat - now, retry, plan, key_type,
          per_sequence}
end

if rec[2] ~= '1' then return reply(2, rpm_tat, tpm_tat, -1) end
if key_type == 'subscription' and rec[5] ~= '' and now >= tonumber(rec[5]) then
  return reply(3, rpm_tat, tpm_tat, -1)
end

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
  if not allowed then return reply(9, rpm_tat, tpm_tat, -1) end
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
local function refuse(code, retry)
  if rolled then redis.call('HSET', KEYS[1], 'spent', 0, 'resets_at', resets_at) end
  return reply(code, rpm_tat, tpm_tat, retry)
end

-- What the budget and the credits can still pay, whichever is less (nil: no limit).
local affordable, short, short_retry = nil, 0, -1
if rec[10] ~= '' then
  affordable = tonumber(rec[10]) - spent
  short, short_retry = 6, resets_at - now
  if affordable <= 0 then return refuse(6, short_retry) end
end
if key_type == 'credit' then
  local balance = tonumber(redis.call('HGET', KEYS[2], 'credits') or '0')
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

local new_rpm_tat = rpm_tat + rpm_interval
if new_rpm_tat - WINDOW > now + 1e-3 then
  return refuse(4, new_rpm_tat - WINDOW - now)
end

-- A request larger than the whole bucket is admitted once the bucket is full and leaves
-- it in debt; later requests wait the debt out.
local new_tpm_tat = tpm_tat + est_tokens * tpm_interval
if new_tpm_tat - WINDOW > now + 1e-3 and tpm_tat > now then
  local wait = new_tpm_tat - WINDOW - now
  if est_tokens * tpm_interval > WINDOW then wait = tpm_tat - now end
  return refuse(5, wait)
end

redis.call('HSET', KEYS[1], 'rpm_tat', new_rpm_tat, 'tpm_tat', new_tpm_tat,
  'rpm_rate', rpm, 'tpm_rate', tpm,
  'spent', spent + cost, 'resets_at', resets_at)
if reserve_credits > 0 then redis.call('HINCRBY', KEYS[2], 'credits', -reserve_credits) end
local reservation = string.format('%.0f %.0f %.0f %.0f %.0f %.0f', est_tokens, cost,
  reserve_credits, resets_at, tpm, now)
redis.call('SET', KEYS[3], reservation, 'EX', ARGV[8])
return reply(0, new_rpm_tat, new_tpm_tat, 0)
