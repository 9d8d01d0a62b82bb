-- One account's outbox as the sender's lag gauges see it, at one instant.
--
-- KEYS[1] = the account's alert outbox   gw:{acct:<id>}:alerts
-- KEYS[2] = account record hash           gw:{acct:<id>}:account
-- returns {length, oldest id ('' when empty), now in ms (Redis time), alerts_dropped}

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local length = redis.call('EXISTS', KEYS[1]) == 1 and redis.call('XLEN', KEYS[1]) or 0
local oldest = ''
if length > 0 then oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1] end
return {length, oldest, now_ms, tonumber(redis.call('HGET', KEYS[2], 'alerts_dropped') or '0')}
