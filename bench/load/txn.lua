-- wrk script: PUT /_matrix/app/v1/transactions/{txnId} with a fresh txnId and fresh event ids
-- per request, the body read from BENCH_BODY (a make_body.py --template file), hs_token from
-- BENCH_HS_TOKEN as `Authorization: Bearer`. BENCH_RUN prefixes the txnIds so that runs never
-- repeat one. done() prints one `BENCH key=value ...` line for bench/run.
local path = assert(os.getenv("BENCH_BODY"), "BENCH_BODY is not set")
local token = assert(os.getenv("BENCH_HS_TOKEN"), "BENCH_HS_TOKEN is not set")
local run = os.getenv("BENCH_RUN") or tostring(os.time())

local f = assert(io.open(path, "rb"))
local template = f:read("*a")
f:close()
-- Timestamps once per run: the bot drops messages older than appservice.max_message_age.
template = template:gsub("@@TS@@", tostring(os.time() * 1000))

-- Split at the placeholder once, so each request is a single table.concat.
local pieces, start = {}, 1
while true do
  local s, e = string.find(template, "@@TXN@@", start, true)
  if not s then
    pieces[#pieces + 1] = template:sub(start)
    break
  end
  pieces[#pieces + 1] = template:sub(start, s - 1)
  start = e + 1
end

local headers = {
  ["Authorization"] = "Bearer " .. token,
  ["Content-Type"] = "application/json",
}
local counter = 0

function request()
  counter = counter + 1
  local id = run .. "x" .. counter
  return wrk.format("PUT", "/_matrix/app/v1/transactions/" .. id, headers,
    table.concat(pieces, id))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d mean_us=%.1f " ..
    "status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.status, e.connect, e.read, e.write, e.timeout))
end
