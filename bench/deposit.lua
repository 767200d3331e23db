-- wrk script: POST pre-signed envelopes, each exactly once.
--
--   wrk -t T -c C -d D --latency -s bench/deposit.lua http://127.0.0.1:PORT -- FILE T
--
-- FILE holds one envelope (a JSON text) per line.  Thread k of T sends lines
-- k, k+T, k+2T, ... so no envelope is sent twice.  A thread that runs out
-- stops and counts an "overrun" (the run is then too short of envelopes and
-- is reported invalid by bench/deposit.py).  done() prints one line
-- "WRKJSON {...}" with the counts and latency percentiles (microseconds).

local threads = {}
local created = 0

function setup(thread)
   thread:set("tid", created)
   created = created + 1
   table.insert(threads, thread)
end

function init(args)
   local file, nthreads = args[1], tonumber(args[2])
   path = args[3] or "/api/mesh/dm/send"
   bodies = {}
   local i = 0
   for line in io.lines(file) do
      if #line > 0 then
         if i % nthreads == tid then
            bodies[#bodies + 1] = line
         end
         i = i + 1
      end
   end
   hdrs = { ["Content-Type"] = "application/json" }
   nxt = 0
   loaded = #bodies
   ok = 0
   dup = 0
   other = 0
   overrun = 0
end

function request()
   nxt = nxt + 1
   if nxt > #bodies then
      -- out of envelopes: stop this thread; the request below is a health probe
      overrun = overrun + 1
      wrk.thread:stop()
      return wrk.format("GET", "/api/mesh/health")
   end
   return wrk.format("POST", path, hdrs, bodies[nxt])
end

function response(status, headers, body)
   if status == 200 then
      if string.find(body, '"duplicate":false', 1, true) or string.find(body, '"duplicate": false', 1, true) then
         ok = ok + 1
      elseif string.find(body, '"duplicate"', 1, true) then
         dup = dup + 1
      end
   else
      other = other + 1
   end
end

function done(summary, latency, requests)
   local t = { loaded = 0, ok = 0, dup = 0, other = 0, overrun = 0 }
   for _, thread in ipairs(threads) do
      for k, _ in pairs(t) do
         t[k] = t[k] + (thread:get(k) or 0)
      end
   end
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"ok":%d,"duplicate":%d,"non200":%d,' ..
      '"overrun":%d,"loaded":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,' ..
      '"err_timeout":%d,"lat_mean_us":%.1f,"lat_max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, t.ok, t.dup, t.other, t.overrun, t.loaded,
      e.connect, e.read, e.write, e.status, e.timeout, latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
