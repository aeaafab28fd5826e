--- procpool.cqueues: procpool waits that yield to a cqueues controller.
--
-- `require "procpool.cqueues"` installs a waiter: inside a coroutine run by
-- a cqueues controller, `f:result()`, `procpool.wait`, map iterators and
-- the rest yield to the controller instead of blocking the process.
-- Executors and futures are cqueues pollables: `cqueues.poll(f)` returns
-- once `f` is done; `cqueues.poll(ex)` once completions are waiting (then
-- call `ex:poll()`).
-- @module procpool.cqueues
local procpool = require "procpool"
local cqueues = require "cqueues"

local M = {}

local poll, cancel = cqueues.poll, cqueues.cancel

--- The waiter: wait for `fd` to be readable, or `timeout` seconds.
function M.waiter(fd, timeout)
  local pollable = { pollfd = fd, events = "r" }
  if timeout then poll(pollable, timeout) else poll(pollable) end
  -- the fd is closed once procpool is done with it: cqueues must not keep
  -- state for a number the kernel will hand out again
  cancel(fd)
end

procpool.set_waiter(M.waiter)

return M
