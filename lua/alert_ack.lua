-- The alert sender is done with these events (delivered to every webhook that wants them,
-- or given up): they leave the consumer group's pending list and the outbox, so the outbox
-- holds exactly what is still to be delivered.
--
-- KEYS[1] = the account's alert outbox   gw:{acct:<id>}:alerts
-- ARGV[1] = consumer group
-- ARGV[2...] = event (stream entry) ids
-- returns the number of events deleted

redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
