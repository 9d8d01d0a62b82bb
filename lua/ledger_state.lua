-- One account's ledger and spend counters, read at one instant: for the exporter's lag
-- metrics and for reconcile (which compares the ledger with the lifetime counters).
--
-- KEYS[1] = the account's ledger stream   gw:{acct:<id>}:ledger
-- KEYS[2] = account record hash           gw:{acct:<id>}:account
-- KEYS[3...] = key record hashes of the account (gw:{acct:<id>}:key:<key_id>), if wanted
-- returns {length, oldest_id, last_id, now_ms, account {total_spent, ledger_base,
--          ledger_dropped, ledger_dropped_micro}, then {total_spent, ledger_base} per key}
--   oldest_id: '' for an empty stream; last_id: the last id ever given ('' for no stream),
--   so reconcile can ignore what was appended after this read

local length = redis.call('XLEN', KEYS[1])
local oldest, last = '', ''
if length > 0 then oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1] end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local t = redis.call('TIME')
local out = {length, oldest, last, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
  redis.call('HMGET', KEYS[2], 'total_spent', 'ledger_base', 'ledger_dropped',
    'ledger_dropped_micro')}
for i = 3, #KEYS do out[#out + 1] = redis.call('HMGET', KEYS[i], 'total_spent', 'ledger_base') end
return out
