-- Renews the leases of requests in flight: a process renews its live requests' slots
-- every third of a lease, so a process that dies frees its slots within one lease.
-- Only slots still held are renewed (ZADD XX): a request settled meanwhile stays free.
--
-- KEYS[1] = the key's slots        gw:{acct:<id>}:slots:<key_id>  (see admit.lua)
-- KEYS[2] = the account's slots    gw:{acct:<id>}:slots
-- ARGV[1] = the lease, microseconds from Redis's now
-- ARGV[2...] = the requests' members (their reservation key names)
-- returns the number of slots renewed (of both sets)

local t = redis.call('TIME')
local lease_end = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1])
local args = {'XX', 'CH'}
for i = 2, #ARGV do
  args[#args + 1] = lease_end
  args[#args + 1] = ARGV[i]
end
if #args == 2 then return 0 end
return redis.call('ZADD', KEYS[1], unpack(args)) + redis.call('ZADD', KEYS[2], unpack(args))
