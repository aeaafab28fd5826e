--- procpool.luv: procpool waits that yield inside coroutines on a luv loop.
--
-- `require "procpool.luv"` installs a waiter: a coroutine that calls
-- `f:result()` (or any blocking procpool call) yields; a libuv poll on the
-- future's fd (and a timer, for a timeout) resumes it from the loop. The
-- main thread, which cannot yield, still blocks.
-- @module procpool.luv
local procpool = require "procpool"
local uv = require "luv"

local M = {}

--- The waiter: wait for `fd` to be readable, or `timeout` seconds.
function M.waiter(fd, timeout)
  local co = coroutine.running()
  local handle, timer = uv.new_poll(fd), nil
  local woken = false
  local function wake()
    if woken then return end
    woken = true
    handle:stop()
    handle:close()
    if timer then
      timer:stop()
      timer:close()
    end
    local ok, err = coroutine.resume(co)
    if not ok then error(err, 0) end
  end
  handle:start("r", wake)
  if timeout then
    timer = uv.new_timer()
    timer:start(math.max(0, math.ceil(timeout * 1000)), 0, wake)
  end
  coroutine.yield()
end

procpool.set_waiter(M.waiter)

return M
