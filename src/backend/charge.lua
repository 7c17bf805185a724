-- sluicegate: charge a bucket for tokens taken elsewhere, or give tokens back.
--
-- The same state and arithmetic as gcra.lua. Used for the tokens a replica's local fallback
-- admitted while Redis could not be reached (charged when Redis answers again, so a bucket
-- does not hand out a local and a shared token for the same time window), and, on Redis
-- Cluster, to give back a token a later layer took for a request an earlier layer refused.
--
-- KEYS[1]  the bucket
-- ARGV[1]  tokens to charge (> 0) or give back (< 0)
-- ARGV[2], ARGV[3]  the bucket's T and tau in ns (T > 0)
--
-- TAT becomes max(TAT, now) + n * T, at most now + tau + T (an empty bucket: gcra.lua never
-- reads one as deeper in debt than that) and at least now (a full bucket: the key is
-- deleted).
-- Returns the whole tokens left in the bucket.

local BILLION = 1000000000
local call, tonumber, sub = redis.call, tonumber, string.sub

local t = call('TIME')
local sec = tonumber(t[1])
local ns = tonumber(t[2]) * 1000
local n = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
if period <= 0 then
  return 0
end

local tat = ns
local value = call('GET', KEYS[1])
if value then
  tat = ((tonumber(sub(value, 1, -10)) or 0) - sec) * BILLION + tonumber(sub(value, -9))
end
if tat < ns then
  tat = ns
end
tat = tat + n * period
if tat > ns + tau + period then
  tat = ns + tau + period
end
if tat <= ns then
  call('DEL', KEYS[1])
  return math.floor((tau + period) / period)
end
local ttl = math.floor((tat - ns + 999999) / 1000000)
local whole = math.floor(tat / BILLION)
call('PSETEX', KEYS[1], ttl, string.format('%d%09d', sec + whole, tat - whole * BILLION))
return math.floor((ns + tau + period - tat) / period)
