-- wrk: POST one small JSON record with one API key, the same request every time.
-- Usage: wrk -t1 -c64 -d10s -s post.lua URL -- KEY
-- A static request (no request() function) is the cheapest thing wrk can send, so the
-- server, not the Lua VM, is what gets measured.
package.path = debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "?.lua;" .. package.path
require("report")

wrk.method = "POST"
wrk.body = '{"n":1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "hot"

function init(args)
   if args[1] then
      wrk.headers["x-api-key"] = args[1]
   end
end

done = wrk_done
