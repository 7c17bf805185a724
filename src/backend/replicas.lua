-- sluicegate: a replica's heartbeat, and the number of live replicas.
--
-- KEYS[1]  the sorted set of replicas (member = replica id, score = expiry in ms, on the
--          Redis server's clock so replicas' clocks never matter)
-- ARGV[1]  this replica's id
-- ARGV[2]  how long its heartbeat lives, in ms
--
-- ZADD and ZREMRANGEBYSCORE are O(log n) (plus the expired members removed), ZCARD O(1):
-- no SCAN over the keyspace. The set itself expires when no replica heartbeats any more.
-- Returns the number of live replicas, this one included.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
