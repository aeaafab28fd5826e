-- luv (libuv) coroutines awaiting procpool futures while timers keep
-- firing on the same loop.
--
-- Run: lua5.4 examples/luv_timers.lua
local uv = require "luv"
local procpool = require "procpool"
require "procpool.luv" -- procpool waits now yield; the loop resumes them

local ex = procpool.ProcessPoolExecutor { max_workers = 2 }

local function fib(n) return n < 2 and n or fib(n - 1) + fib(n - 2) end

local function go(fn) assert(coroutine.resume(coroutine.create(fn))) end

local done, ticks = {}, 0
for _, n in ipairs({ 29, 30 }) do
  go(function()
    -- runs in a worker; this coroutine yields until the result is in
    local v = ex:submit(fib, n):result(60)
    done[#done + 1] = ("fib(%d) = %d"):format(n, v)
  end)
end

local timer = uv.new_timer()
timer:start(20, 20, function()
  ticks = ticks + 1
  if #done == 2 then
    timer:stop()
    timer:close()
  end
end)

local t0 = uv.hrtime()
uv.run()
ex:shutdown()
table.sort(done)
print(table.concat(done, ", "))
print(("the timer ticked %d times while the pool worked (%.2f s)"):format(ticks,
  (uv.hrtime() - t0) / 1e9))
