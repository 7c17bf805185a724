-- sluicegate: many admission requests in one atomic step, each decided exactly as gcra.lua
-- would decide it alone, one after another in the order given.
--
-- Why: a script call costs Redis a few microseconds whatever it does, and requests that
-- arrive together mostly share their global and route buckets. Here every distinct key is
-- read once (one MGET) and written once (its final state, after the last request), so a
-- batch of n requests costs one call, one read and a write per distinct key instead of n
-- calls, n reads and a write per admitting layer of each.
--
-- KEYS      per request, in order: its buckets (global, route, key), then its usage
--           counter when it has one
-- ARGV      per request, in order: a header of four values
--             now       ns since the Unix epoch as a decimal string; '' = the server's TIME
--                       (read once for the whole batch)
--             min_ttl   minimum TTL in ms (0 in production; see gcra.lua)
--             buckets   the number of its buckets
--             counted   1 when a usage counter follows its buckets, else 0
--           then each bucket's T and tau in ns (T = 0: a closed layer), then — when
--           counted — the counter's limit, its expiry (PEXPIREAT, ms since the epoch) and
--           the request's cost
--
-- Returns one reply per request, each exactly gcra.lua's reply for that request given the
-- state the requests before it left: {1, i, remaining, reset_ns[, used]} or
-- {0, i, wait_ns, 0} ({0, #its keys, used, 0, used} when its usage counter refused).
--
-- The arithmetic is gcra.lua's, line for line; only where state lives differs: a bucket's
-- TAT is kept in a table between requests, and the final string of each written bucket is
-- stored with the TTL its last write computed — what n separate PSETEXs would have left. A counter's increments are summed into one
-- INCRBY, followed by PEXPIREAT, as gcra.lua does per request.

local BILLION = 1000000000
local call, tonumber, sub, floor, format = redis.call, tonumber, string.sub, math.floor, string.format

-- floor(a / b) for integers a >= 0, b > 0, exactly (see gcra.lua).
local function idiv(a, b)
  local q = floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- The server's clock, read at most once.
local server_sec, server_ns
local function clock(arg)
  if arg ~= '' then
    return tonumber(sub(arg, 1, -10)) or 0, tonumber(sub(arg, -9))
  end
  if not server_sec then
    local t = call('TIME')
    server_sec = tonumber(t[1])
    server_ns = tonumber(t[2]) * 1000
  end
  return server_sec, server_ns
end

-- Every key's stored value, read with one MGET (false: no key).
local raw = {}
if #KEYS > 0 then
  local stored = call('MGET', unpack(KEYS))
  for i = 1, #KEYS do
    raw[KEYS[i]] = stored[i]
  end
end

-- A bucket's TAT, once read: secs[key] * 1e9 + vals[key] ns since the epoch (secs false: no
-- state). A write keeps it relative to the writing request's second, so a later request
-- converts it exactly as gcra.lua would parse the string the write stored (whole numbers
-- below 2^53 for refill times up to ~104 days, as in gcra.lua), and the string is formatted
-- once, at the end.
local secs, vals = {}, {}
-- A counter's count, once read.
local counts = {}
-- Writes, applied after the last request: each bucket's TTL from its last write, each
-- counter's summed increment and expiry; `written` keeps the order of first writes.
local ttls, increments, expiries, written = {}, {}, {}, {}

local replies = {}
local k, a = 0, 0
while a < #ARGV do
  local sec, ns = clock(ARGV[a + 1])
  local min_ttl = tonumber(ARGV[a + 2])
  local buckets = tonumber(ARGV[a + 3])
  local counted = ARGV[a + 4] == '1'
  local params = a + 4
  local keys = k
  local nkeys = buckets + (counted and 1 or 0)
  k = k + nkeys
  a = params + 2 * buckets + (counted and 3 or 0)

  local result = {1, 0, 0, 0}
  local refused = false
  for i = 1, buckets do
    local key = KEYS[keys + i]
    local t = tonumber(ARGV[params + 2 * i - 1])
    local tau = tonumber(ARGV[params + 2 * i])
    if t == 0 then
      result = {0, i, -1, 0}
      refused = true
      break
    end
    local s = secs[key]
    if s == nil then
      local value = raw[key]
      if value then
        s = tonumber(sub(value, 1, -10)) or 0
        vals[key] = tonumber(sub(value, -9))
      else
        s = false
      end
      secs[key] = s
    end
    local tat = ns
    if s then
      tat = (s - sec) * BILLION + vals[key]
      if tat > ns + tau + t then
        tat = ns + tau + t
      end
    end
    if ns < tat - tau then
      result = {0, i, tat - tau - ns, 0}
      refused = true
      break
    end
    local nxt = (tat > ns and tat or ns) + t
    local remaining = idiv(ns + tau + t - nxt, t)
    local ttl = idiv(nxt - ns + 999999, 1000000)
    if ttl < min_ttl then
      ttl = min_ttl
    end
    if not ttls[key] then
      written[#written + 1] = key
    end
    secs[key] = sec
    vals[key] = nxt
    ttls[key] = ttl
    result = {1, i, remaining, nxt - ns}
  end
  if counted and not refused then
    local counter = KEYS[keys + nkeys]
    local base = params + 2 * buckets
    local limit = tonumber(ARGV[base + 1])
    local cost = tonumber(ARGV[base + 3])
    local used = counts[counter]
    if used == nil then
      used = tonumber(raw[counter] or '0') or 0
    end
    if used + cost > limit then
      result = {0, nkeys, used, 0, used}
    else
      used = used + cost
      if not increments[counter] then
        written[#written + 1] = counter
        increments[counter] = 0
      end
      increments[counter] = increments[counter] + cost
      expiries[counter] = ARGV[base + 2]
      result[5] = used
    end
    counts[counter] = used
  end
  replies[#replies + 1] = result
end

for _, key in ipairs(written) do
  if increments[key] then
    call('INCRBY', key, increments[key])
    call('PEXPIREAT', key, expiries[key])
  else
    local v = vals[key]
    local whole = idiv(v, BILLION)
    call('PSETEX', key, ttls[key], format('%d%09d', secs[key] + whole, v - whole * BILLION))
  end
end
return replies
