-- A cqueues TCP service that stays responsive while CPU-heavy work runs in
-- a procpool executor. One coroutine serves "ping" requests; another asks
-- for prime counts, which run in worker processes; a client sends pings
-- the whole time and measures how fast they come back.
--
-- Run: lua5.4 examples/cqueues_server.lua
local cqueues = require "cqueues"
local socket = require "cqueues.socket"
local procpool = require "procpool"
require "procpool.cqueues" -- procpool waits now yield to the controller

local function count_primes(lo, hi)
  local n = 0
  for i = math.max(lo, 2), hi do
    local prime = true
    for d = 2, math.floor(math.sqrt(i)) do
      if i % d == 0 then
        prime = false
        break
      end
    end
    if prime then n = n + 1 end
  end
  return n
end

local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
local cq = cqueues.new()
local server = socket.listen("127.0.0.1", 0)
local _, _, port = server:localname()

-- the service: "ping" -> "pong", "primes A B" -> the count, from the pool
local finished = false
cq:wrap(function()
  while not finished do
    local conn = server:accept(0.05)
    if conn then cq:wrap(function()
      for line in conn:lines("*l") do
        local a, b = line:match("^primes (%d+) (%d+)$")
        if a then
          local n = ex:submit(count_primes, tonumber(a), tonumber(b)):result(60)
          conn:write(n, "\n")
        else
          conn:write("pong\n")
        end
      end
      conn:close()
    end) end
  end
  server:close()
end)

-- a client: two heavy requests on their own connections, pings meanwhile
local results, worst, pings = {}, 0, 0
local heavy_done = 0
for k, range in ipairs({ { 1, 600000 }, { 600001, 1200000 } }) do
  cq:wrap(function()
    local c = socket.connect("127.0.0.1", port)
    c:write(("primes %d %d\n"):format(range[1], range[2]))
    results[k] = tonumber(c:read("*l"))
    c:close()
    heavy_done = heavy_done + 1
  end)
end
cq:wrap(function()
  local c = socket.connect("127.0.0.1", port)
  while heavy_done < 2 do
    local t0 = cqueues.monotime()
    c:write("ping\n")
    assert(c:read("*l") == "pong")
    worst = math.max(worst, cqueues.monotime() - t0)
    pings = pings + 1
    cqueues.sleep(0.01)
  end
  c:close()
  finished = true
end)

local t0 = cqueues.monotime()
assert(cq:loop())
ex:shutdown()
print(("primes below 1 200 000: %d (%d + %d), computed in the pool in %.2f s"):format(
  results[1] + results[2], results[1], results[2], cqueues.monotime() - t0))
print(("meanwhile %d pings answered, the slowest in %.1f ms"):format(pings, worst * 1000))
