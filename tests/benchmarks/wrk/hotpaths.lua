-- wrk script of tests/benchmarks/bench_hotpaths.py: one hot path per run, every request
-- on a different pre-created session, sent with the token of the bot that owns it.
--
--   wrk -t T -c C -d 5s --latency -s hotpaths.lua http://127.0.0.1:PORT \
--       -- <path> <ids-file> <tag>
--
-- <path>: healthz | get | heartbeat | messages | create
-- <ids-file>: one "<session_id> <token>" line per session (token = its owning bot's)
-- <tag>: unique per run, so that message ids and created shops never repeat
--
-- Thread k of T sends its n-th request to session (k + n*T) mod N: the threads never
-- share a session, and one session is hit again only after N requests. A create uses a
-- fresh shop (<tag>-<thread>-<n>) and the token of session (k + n*T) mod N's bot, so the
-- requests are spread over the whole fleet of bots (each with its own rate limit).
-- At the end one line "WRKJSON {...}" carries the figures (latencies in microseconds,
-- status codes counted by response()).

local threads = {}
local thread_count = 0

function setup(thread)
  thread:set("thread_no", thread_count)
  thread_count = thread_count + 1
  table.insert(threads, thread)
end

function init(args)
  path = args[1]
  tag = args[3] or "run"
  stride = tonumber(args[4] or "1")
  sessions, tokens = {}, {}
  if path ~= "healthz" then
    for line in io.lines(args[2]) do
      local sid, token = line:match("^(%S+)%s+(%S+)")
      if sid then
        table.insert(sessions, sid)
        table.insert(tokens, "Bearer " .. token)
      end
    end
    if #sessions == 0 then
      error("no sessions in " .. tostring(args[2]))
    end
  end
  n = 0
  codes = {}
  healthz_request = wrk.format("GET", "/healthz")
end

local auth_headers = {}
local json_headers = {["Content-Type"] = "application/json"}

local function pick()
  local i = ((thread_no + n * stride) % #sessions) + 1
  return sessions[i], tokens[i]
end

function request()
  n = n + 1
  if path == "healthz" then
    return healthz_request
  end
  local sid, auth = pick()
  auth_headers["Authorization"] = auth
  json_headers["Authorization"] = auth
  if path == "get" then
    return wrk.format("GET", "/api/v1/sessions/" .. sid, auth_headers)
  elseif path == "heartbeat" then
    return wrk.format("POST", "/api/v1/sessions/" .. sid .. "/heartbeat", auth_headers, "")
  elseif path == "messages" then
    local body = string.format(
      '{"messages":[{"message_id":"m-%s-%d-%d","content":"bench: is the price final?",'
      .. '"sender_role":"robot"}]}', tag, thread_no, n)
    return wrk.format("POST", "/api/v1/sessions/" .. sid .. "/messages", json_headers, body)
  elseif path == "create" then
    local body = string.format(
      '{"account_id":"bench-create","shop_id":"%s-%d-%d","session_type":"AUTO_BARGAIN"}',
      tag, thread_no, n)
    return wrk.format("POST", "/api/v1/sessions", json_headers, body)
  end
  error("unknown path " .. tostring(path))
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    local got = thread:get("codes")
    if got then
      for code, count in pairs(got) do
        merged[code] = (merged[code] or 0) + count
      end
    end
  end
  local parts = {}
  for code, count in pairs(merged) do
    table.insert(parts, string.format('"%d":%d', code, count))
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
    .. '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d},'
    .. '"codes":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), table.concat(parts, ",")))
end
