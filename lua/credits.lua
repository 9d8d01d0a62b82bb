-- An operator's credit adjustment: the balance changes and the change is recorded with its
-- reason, in one step. The record is bounded: only the newest ARGV[4] adjustments are kept.
--
-- KEYS[1] = account record hash      gw:{acct:<id>}:account
-- KEYS[2] = the account's credit log gw:{acct:<id>}:credit-log  (a list, newest first)
-- ARGV[1] = the change, integer micro-USD (negative to take credits away)
-- ARGV[2] = the reason (text)
-- ARGV[3] = who made it ('cli', 'admin-api' or 'dashboard', the operator's dashboard)
-- ARGV[4] = how many adjustments the log keeps
-- The account's alert_credits_low marker (see settle.lua) is removed when the balance after
-- is at least the threshold it holds: credits.low may fire again.
-- returns {code, balance}
--   code (CreditCode in gateway/store/codes.py): 0 applied, 1 missing account,
--         2 negative balance (refused: the balance would fall below zero)
--   balance: the balance after (or as it is, when refused), micro-USD

if redis.call('EXISTS', KEYS[1]) == 0 then return {1, 0} end
local delta = tonumber(ARGV[1])
local balance = tonumber(redis.call('HGET', KEYS[1], 'credits') or '0')
if balance + delta < 0 then return {2, balance} end
local after = redis.call('HINCRBY', KEYS[1], 'credits', ARGV[1])
-- alerts: credits.low fired below a threshold (settle.lua) is armed again once the balance
-- is back up to that threshold.
local low = tonumber(redis.call('HGET', KEYS[1], 'alert_credits_low') or '')
if low and after >= low then redis.call('HDEL', KEYS[1], 'alert_credits_low') end
local t = redis.call('TIME')
redis.call('LPUSH', KEYS[2], cjson.encode({
  at = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])),
  micro = ARGV[1], balance = string.format('%.0f', after), by = ARGV[3], reason = ARGV[2]}))
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
return {0, after}
