-- The exporter's acknowledgement, sent only after PostgreSQL committed the entries: they
-- leave the consumer group's pending list and the stream, so the stream holds exactly what
-- is not yet stored (its length is the exporter's lag).
--
-- KEYS[1] = the account's ledger stream   gw:{acct:<id>}:ledger
-- ARGV[1] = consumer group
-- ARGV[2...] = entry ids
-- returns the number of entries deleted

redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
