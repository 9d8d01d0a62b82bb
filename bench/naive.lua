-- The naive composition's stand-in for an admission or a settlement script: one hash
-- update, so each call costs the client what any EVALSHA through redis-py costs.
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
