-- A worker's read of one account's stream through its consumer group (made here, from the
-- stream's first entry, the first time it is needed): the ledger exporter's read of
-- gw:{acct:<id>}:ledger (group ledger-export), the alert sender's of gw:{acct:<id>}:alerts
-- (group alert-send).
--
-- KEYS[1] = the stream
-- ARGV[1] = consumer group
-- ARGV[2] = consumer name
-- ARGV[3] = most entries to return
-- ARGV[4] = '>'      entries no consumer has been given yet
--           '0'      the entries given to this consumer and not acknowledged (after a crash)
--           'claim'  entries given to any consumer that have waited ARGV[5] ms unacknowledged
--                    (a worker that died under another name), now this consumer's
-- ARGV[5] = with 'claim': the idle time, milliseconds
-- returns {{id, {field, value, ...}}, ...}, oldest first; {} when there is none

if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local function read()
  if ARGV[4] == 'claim' then
    local claimed = redis.pcall('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[5], '0',
      'COUNT', ARGV[3])
    if claimed.err then return claimed end
    return claimed[2]
  end
  local reply = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
    'STREAMS', KEYS[1], ARGV[4])
  if type(reply) == 'table' and reply.err then return reply end
  if not reply then return {} end
  return reply[1][2]
end
local entries = read()
if entries.err then
  if not string.find(entries.err, 'NOGROUP') then return entries end
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0')
  entries = read()
  if entries.err then return entries end
end
-- An entry deleted while pending (dropped or trimmed at its stream's cap) comes back
-- without its fields: it leaves the pending list here, as nothing can use it.
local out = {}
for _, entry in ipairs(entries) do
  if type(entry[2]) == 'table' then out[#out + 1] = entry
  else redis.call('XACK', KEYS[1], ARGV[1], entry[1]) end
end
return out
