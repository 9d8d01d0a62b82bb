-- A refusal the caller counts: one admit.lua left uncounted because the plan queues (a
-- refusal for RPM, TPM or a slot may still end in an admission after a wait), counted here
-- once the request is refused in the end. The same field as admit.lua's own count.
--
-- KEYS[1] = usage counter prefix   gw:{acct:<id>}:usage:<key_id>  (see settle.lua)
-- returns the key's refusals counted in this minute, this one included

local t = redis.call('TIME')
local minute = math.floor(tonumber(t[1]) / 60)
local hash = KEYS[1] .. ':m:' .. math.floor(minute / 60)
local n = redis.call('HINCRBY', hash, 'x' .. (minute % 60), 1)
if n == 1 then redis.call('EXPIRE', hash, 7200) end
return n
