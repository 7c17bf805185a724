-- Shared by every wrk script here: print wrk's own numbers as one JSON line that
-- loadtest/lib.sh picks up (prefix "WRKJSON "). Latency values are microseconds.
function wrk_done(summary, latency, requests)
   local p = {}
   for _, q in ipairs({ 50, 75, 90, 99, 99.9, 99.99 }) do
      p[#p + 1] = string.format('"%g":%d', q, latency:percentile(q))
   end
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,"percentiles":{%s}},' ..
      '"rps_per_thread":{"mean":%.1f,"stdev":%.1f,"max":%.1f}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.max, latency.mean, latency.stdev, table.concat(p, ","),
      requests.mean, requests.stdev, requests.max))
end
