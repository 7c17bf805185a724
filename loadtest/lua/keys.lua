-- wrk: POST one small JSON record per request with x-api-key drawn from N keys.
-- Usage: wrk -t1 -c64 -d10s -s keys.lua URL -- N [sequential]
--   N           number of distinct keys "k0" .. "k<N-1>" (N = 1 gives the single-key
--               baseline with exactly the same per-request Lua cost)
--   sequential  walk the keys in order instead of uniformly at random (warm-up passes)
-- Every request string is built once in init(); request() only picks one, so wrk's
-- own cost does not depend on N.
package.path = debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "?.lua;" .. package.path
require("report")

local reqs = {}
local n = 1
local sequential = false
local next_index = 0

function init(args)
   n = tonumber(args[1] or "1")
   sequential = args[2] == "sequential"
   local headers = { ["Content-Type"] = "application/json" }
   for i = 0, n - 1 do
      headers["x-api-key"] = "k" .. i
      reqs[i + 1] = wrk.format("POST", nil, headers, '{"n":1}')
   end
   math.randomseed(os.time())
end

function request()
   local i
   if sequential then
      i = next_index % n + 1
      next_index = next_index + 1
   else
      i = math.random(n)
   end
   return reqs[i]
end

done = wrk_done
