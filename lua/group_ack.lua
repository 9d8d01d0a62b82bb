-- A worker is done with these entries (the ledger exporter: PostgreSQL committed them; the
-- alert sender: delivered to every webhook that wants them, or given up): they leave the
-- consumer group's pending list and the stream, so the stream holds exactly what is still
-- to do (its length is the worker's lag).
--
-- KEYS[1] = the stream (see group_read.lua)
-- ARGV[1] = consumer group
-- ARGV[2...] = entry ids
-- returns the number of entries deleted

redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
