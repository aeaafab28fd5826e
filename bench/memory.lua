-- The memory targets: bytes of RSS per pending tiny task in the parent
-- (1e6 pending behind a blocked worker), beside a pending Python
-- concurrent.futures Future; and RSS over 1e7 tiny tasks run in waves
-- of 100 000 outstanding.
local procpool = require "procpool"
local B = require "bench.lib"

local noop = function(x) return x end

local function rss()
  local f = assert(io.open("/proc/self/statm"))
  local _, resident = f:read("n", "n")
  f:close()
  return resident * 4096
end

local function collected_rss()
  collectgarbage()
  collectgarbage()
  return rss()
end

-- 1. bytes per pending task: everything the parent holds for it (the
-- job, the Future, the caller's array slot), as RSS grows
local N_PENDING = 1000000
local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
ex:submit(noop):result()
local pending = { ex:submit(function() require("procpool.core").sleep(60) end) }
local r0 = collected_rss()
for i = 2, N_PENDING + 1 do pending[i] = ex:submit(noop) end
local per_pending = (collected_rss() - r0) / N_PENDING
assert(#pending == N_PENDING + 1)
ex:kill_workers()
ex:shutdown()
pending = nil -- luacheck: ignore 311

-- 2. RSS over 1e7 tasks: waves of WAVE submits, then their results
local WAVE, N_TOTAL = 100000, 10000000
ex = procpool.ProcessPoolExecutor { max_workers = 2 }
ex:submit(noop):result()
local start = collected_rss()
local after_first, done = nil, 0
local t = B.now()
while done < N_TOTAL do
  local wave = {}
  for i = 1, WAVE do wave[i] = ex:submit(noop, i) end
  for i = 1, WAVE do wave[i]:result() end
  done = done + WAVE
  if done == N_TOTAL // 10 then after_first = collected_rss() end
end
t = B.now() - t
local final = collected_rss()
ex:shutdown()
-- flat: the end within 10% (or 4 MiB, if more) of the value after the first 1e6
local slack = math.max(after_first * 0.10, 4 * 2 ^ 20)
local flat = final <= after_first + slack

local py = B.python({ "pending_bytes" })
local MiB = function(x) return string.format("%.1f MiB", x / 2 ^ 20) end

print("## Memory (bench/memory.lua)")
print()
B.table({
  { "measure", "procpool", "Python", "target", "met" },
  { "RSS per pending no-op task (1e6 pending; Python: 1e5)", string.format("%.0f B", per_pending),
    py.pending_bytes and string.format("%.0f B", py.pending_bytes) or "n/a", "<= 200 B",
    per_pending <= 200 and "met" or "not met" },
  { string.format("RSS over 1e7 tasks, waves of 100k (%.1f s): start / after 1e6 / end", t),
    MiB(start) .. " / " .. MiB(after_first) .. " / " .. MiB(final), "",
    "end <= after 1e6 + max(10%, 4 MiB)", flat and "met" or "not met" },
})
