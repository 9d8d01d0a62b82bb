-- Dashboard sign-in attempts of one client address: at most ARGV[1] in any ARGV[2] seconds
-- (a sliding log of the attempts' times, Redis time). One call = one attempt, counted
-- whether its key turns out right or wrong.
--
-- KEYS[1] = the address's attempts, a sorted set   gw:dash-signin:<client address>
-- ARGV[1] = attempts allowed in the window
-- ARGV[2] = the window, seconds
-- returns {allowed (1|0), attempts in the window (this one included when allowed),
--          retry_after_us (0 when allowed: the time until the oldest attempt leaves)}

local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2]) * 1000000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - window))
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = tonumber(oldest[2]) + window - now
  return {0, count, string.format('%.0f', math.max(1, wait))}
end
-- The member is unique: the time, and the count before it (at most `limit` members).
redis.call('ZADD', KEYS[1], string.format('%.0f', now),
  string.format('%.0f-%d', now, count))
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return {1, count + 1, 0}
