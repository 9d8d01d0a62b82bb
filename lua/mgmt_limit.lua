-- Management rate limit: a GCRA token bucket per management principal (capacity and
-- refill given by the caller, e.g. 12 per 12 hours). One call = one request.
--
-- KEYS[1] = bucket string          gw:{acct:<id>}:mgmt-rl:<principal>
-- ARGV[1] = capacity (requests)
-- ARGV[2] = refill period, seconds (the whole capacity refills in this time)
-- returns {allowed (1|0), remaining, retry_after_us, reset_us, now_us}
--   retry_after_us is 0 when allowed; reset_us is the time until the bucket is full again.

local function fmt(x) return string.format('%.0f', x) end

local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2]) * 1000000
local interval = period / capacity

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local new_tat = tat + interval

local function remaining(at)
  return math.max(0, math.floor((now + period - at) / interval + 1e-6))
end

if new_tat - period > now + 1e-3 then
  return {0, remaining(tat), fmt(new_tat - period - now), fmt(tat - now), fmt(now)}
end
-- The bucket is full again once now reaches the TAT, so the key may expire then.
redis.call('SET', KEYS[1], fmt(new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, remaining(new_tat), 0, fmt(new_tat - now), fmt(now)}
