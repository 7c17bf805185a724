-- sluicegate: GCRA token buckets, checked in order in one atomic step.
--
-- The same arithmetic as governor's GCRA (src/limit/engine.rs), in integer nanoseconds:
-- a bucket's state is its theoretical arrival time (TAT); with period T (ns per token) and
-- tolerance tau = T * (burst - 1), a request at `now` is admitted iff now >= TAT - tau, and
-- then TAT becomes max(TAT, now) + T. No state means a full bucket (TAT = now).
--
-- KEYS[i]   bucket i, checked in order (global, route, key; or one invoke-rate bucket)
-- ARGV[1]   now, in ns since the Unix epoch as a decimal string; '' = the server's TIME,
--           so replicas' clocks never matter (tests pass a logical time)
-- ARGV[2]   minimum TTL in ms (0 in production; tests whose logical clock runs slower
--           than Redis' expiry clock pass a large value)
-- ARGV[2i+1], ARGV[2i+2]   bucket i's T and tau in ns; T = 0 is a closed layer
--
-- Layers are checked in order and the first refusal ends the script: tokens taken by the
-- layers before it stay taken (API Gateway semantics, as in the local engine); a refusing
-- bucket is not written. All buckets are read with one MGET; an admitted bucket is written
-- (PSETEX) with an expiry at the instant it is full again (TAT <= now), when it is
-- indistinguishable from no state.
--
-- Returns {1, i, remaining, reset_ns} for an admission (i = the last bucket), or
-- {0, i, wait_ns, 0} for a refusal by bucket i (wait_ns = -1: closed layer).
--
-- Usage quota (optional): the LAST key is then a request counter, and three arguments follow
-- the buckets' pairs: its limit, its expiry (PEXPIREAT, ms since the epoch: the period's
-- end) and the cost of this request (1). The counter is checked only once every bucket
-- admitted the request, so a request shed by a bucket uses no quota: past the limit the
-- answer is {0, #KEYS, used, 0, used} and nothing is counted (the buckets keep the tokens
-- they gave, as for any refusal by a later layer); otherwise the counter is incremented and
-- the admission's answer carries the new count as a fifth element.
--
-- Needs Redis >= 5, where scripts replicate their effects (so a write after TIME is fine).
--
-- Times are kept relative to the current whole second, so Lua's doubles hold them exactly
-- for refill times up to 2^53 ns (about 104 days); a longer one (config allows ten years)
-- rounds to a multiple of a few dozen ns, which no decision can tell apart. A TAT is stored
-- as the decimal digits of its ns since the epoch and split, not converted, for the same
-- reason.

local BILLION = 1000000000
local call, tonumber, sub, floor = redis.call, tonumber, string.sub, math.floor

-- floor(a / b) for integers a >= 0, b > 0, exactly: the division of two doubles is rounded,
-- and near an integer that rounding can cross it.
local function idiv(a, b)
  local q = floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local sec, ns
if ARGV[1] == '' then
  local t = call('TIME')
  sec = tonumber(t[1])
  ns = tonumber(t[2]) * 1000
else
  sec = tonumber(sub(ARGV[1], 1, -10)) or 0
  ns = tonumber(sub(ARGV[1], -9))
end
local min_ttl = tonumber(ARGV[2])

local result = {1, 0, 0, 0}
if #KEYS == 0 then
  return result
end
-- Two arguments per bucket after the first two; three more when the last key is a counter.
local buckets = #KEYS
local quota = #ARGV == 2 * #KEYS + 3
if quota then
  buckets = #KEYS - 1
end
-- One read for every bucket (most requests are refused or admitted without writing all).
local stored = buckets > 0 and call('MGET', unpack(KEYS, 1, buckets)) or {}
for i = 1, buckets do
  local t = tonumber(ARGV[2 * i + 1])
  local tau = tonumber(ARGV[2 * i + 2])
  if t == 0 then
    return {0, i, -1, 0}
  end
  local tat = ns
  local value = stored[i]
  if value then
    tat = ((tonumber(sub(value, 1, -10)) or 0) - sec) * BILLION + tonumber(sub(value, -9))
    -- Never more in debt than this quota allows: the quota of an invoke bucket changes with
    -- the adaptive rate. With a constant quota this never applies (TAT <= now + tau + T).
    if tat > ns + tau + t then
      tat = ns + tau + t
    end
  end
  if ns < tat - tau then
    return {0, i, tat - tau - ns, 0}
  end
  local nxt = (tat > ns and tat or ns) + t
  local remaining = idiv(ns + tau + t - nxt, t)
  local ttl = idiv(nxt - ns + 999999, 1000000)
  if ttl < min_ttl then
    ttl = min_ttl
  end
  local whole = idiv(nxt, BILLION)
  call('PSETEX', KEYS[i], ttl, string.format('%d%09d', sec + whole, nxt - whole * BILLION))
  result = {1, i, remaining, nxt - ns}
end
if quota then
  local counter = KEYS[#KEYS]
  local base = 2 * buckets + 2
  local limit = tonumber(ARGV[base + 1])
  local cost = tonumber(ARGV[base + 3])
  local used = tonumber(call('GET', counter) or '0') or 0
  if used + cost > limit then
    return {0, #KEYS, used, 0, used}
  end
  used = call('INCRBY', counter, cost)
  call('PEXPIREAT', counter, ARGV[base + 2])
  result[5] = used
end
return result
