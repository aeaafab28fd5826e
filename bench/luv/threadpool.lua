-- luv's thread pool (libuv's uv_queue_work) on the pipelined no-op
-- workload of bench/perf.lua: N tasks queued at once, each a no-op that
-- returns its argument, timed from the first queue to the end of the
-- uv.run() in which the last after-callback ran.
--
-- Usage: [UV_THREADPOOL_SIZE=k] lua5.4 bench/luv/threadpool.lua [N [RUNS]]
-- Prints "tasks_per_s <best of RUNS> threads <pool size>". libuv reads
-- UV_THREADPOOL_SIZE once, when it starts its pool, so the size can only
-- be chosen from outside, before this process starts.
local uv = require "luv"

local N = tonumber(arg[1]) or 20000
local RUNS = tonumber(arg[2]) or 5

local function run()
  local done = 0
  -- the work function runs in a pool thread's own lua_State (luv dumps
  -- and loads it there); its results come back to the after-callback
  local work = uv.new_work(function(x) return x end, function(x)
    done = done + 1
    assert(x ~= nil)
  end)
  local t = uv.hrtime()
  for i = 1, N do work:queue(i) end
  uv.run()
  t = (uv.hrtime() - t) / 1e9
  assert(done == N, "only " .. done .. " after-callbacks ran")
  return t
end

run() -- starts the pool's threads and their Lua states
local best = math.huge
for _ = 1, RUNS do
  collectgarbage()
  collectgarbage()
  best = math.min(best, run())
end
print(string.format("tasks_per_s %.0f threads %s", N / best, os.getenv("UV_THREADPOOL_SIZE") or "4"))
