--- procpool.futures: futures and waiting on many of them.
--
-- Completes the Future userdata made in src/future.c (`core.Future`),
-- which holds its state, its done callbacks and the one wait primitive
-- (`core.await`): this file adds `Future:result` and `Future:exception`,
-- and the module functions `wait`, `as_completed` and `set_waiter`.
-- @module procpool.futures
local core = require "procpool.core"
local check = require "procpool.check"

local M = {}

M.FIRST_COMPLETED = "FIRST_COMPLETED"
M.FIRST_EXCEPTION = "FIRST_EXCEPTION"
M.ALL_COMPLETED = "ALL_COMPLETED"

local await = core.await
local raise, argerror, deadline_of, check_opts, is_future =
  check.raise, check.argerror, check.deadline_of, check.check_opts, check.is_future
local Future = core.Future.__index

--- Install the waiter used by blocking calls inside coroutines.
-- `fn(fd, timeout)` is called from the waiting coroutine; it should return
-- once `fd` is readable or `timeout` seconds (nil: no limit) have passed,
-- typically by yielding to a scheduler. `nil` removes it.
function M.set_waiter(fn)
  if fn ~= nil and type(fn) ~= "function" then
    argerror(1, "set_waiter", "function or nil expected, got " .. type(fn))
  end
  core.set_waiter(fn)
end

---------------------------------------------------------------------------
-- Future

--- A future's outcome, `_outcome()`'s `ok, ...`, as a call returns it:
-- the values, or the error raised unchanged.
function M.finish(ok, ...)
  if ok then return ... end
  error((...), 0)
end

local finish = M.finish

--- All the values the task returned; raises its error unchanged,
-- `TimeoutError` when not done in time, `CancelledError` if cancelled.
-- (core.fast_result answers the commonest case in C, before this runs:
-- a bad timeout is its caller's, at level 4)
Future.result = core.fast_result(function(self, timeout)
  local d = deadline_of(timeout, "result", 4)
  if not await(self, d) then
    raise("TimeoutError", string.format("the future did not finish within %g seconds", timeout))
  end
  return finish(self:_outcome())
end)

--- The task's error value, or nil if it succeeded.
function Future:exception(timeout)
  local d = deadline_of(timeout, "exception")
  if not await(self, d) then
    raise("TimeoutError", string.format("the future did not finish within %g seconds", timeout))
  end
  local ok, err = self:_outcome()
  if ok then return nil end
  if self:cancelled() then error(err, 0) end
  return err
end

--- What the task wrote to its stdout and stderr (two strings), when it
-- ran with `output = "capture"`; nil otherwise. Waits as exception()
-- does; for a task whose worker died, what it wrote until then.
function Future:output(timeout)
  local d = deadline_of(timeout, "output")
  if not await(self, d) then
    raise("TimeoutError", string.format("the future did not finish within %g seconds", timeout))
  end
  if self:cancelled() then error((select(2, self:_outcome())), 0) end
  local out, err = self:_output()
  return out, err
end

---------------------------------------------------------------------------
-- waiting on many futures

local function unique_futures(fs, fname)
  if type(fs) ~= "table" then argerror(1, fname, "table of futures expected, got " .. type(fs)) end
  local list, seen = {}, {}
  for i = 1, fs.n or #fs do
    local f = fs[i]
    if not is_future(f) then
      argerror(1, fname, "item " .. i .. " is not a future (" .. type(f) .. ")")
    end
    if not seen[f] then
      seen[f] = true
      list[#list + 1] = f
    end
  end
  return list
end

local WAIT_MODES = {
  [M.ALL_COMPLETED] = "all", [M.FIRST_COMPLETED] = "any", [M.FIRST_EXCEPTION] = "exc",
}

--- Wait for futures; returns `done, not_done` (arrays, input order, each
-- future once). Never raises TimeoutError: on timeout it returns the split.
function M.wait(fs, opts)
  opts = check_opts(opts, { timeout = true, return_when = true }, "wait")
  local list = unique_futures(fs, "wait")
  local mode = WAIT_MODES[opts.return_when or M.ALL_COMPLETED]
  if not mode then
    error("Invalid return condition: " .. tostring(opts.return_when), 2)
  end
  local d = deadline_of(opts.timeout, "wait")
  if #list > 0 then await(list, d, mode) end
  local done, not_done = {}, {}
  for _, f in ipairs(list) do
    if f:done() then done[#done + 1] = f else not_done[#not_done + 1] = f end
  end
  return done, not_done
end

--- Iterate futures as they complete (already-done ones first). The
-- timeout counts from this call; when it passes with futures left, the
-- iterator raises TimeoutError.
function M.as_completed(fs, timeout)
  local pending = unique_futures(fs, "as_completed")
  local total = #pending
  local d = deadline_of(timeout, "as_completed")
  local ready, finished = {}, false
  local function collect()
    local keep = {}
    for _, f in ipairs(pending) do
      if f:done() then ready[#ready + 1] = f else keep[#keep + 1] = f end
    end
    pending = keep
  end
  collect()
  return function()
    if finished then return nil end
    while true do
      if #ready > 0 then return table.remove(ready, 1) end
      if #pending == 0 then
        finished = true
        return nil
      end
      if not await(pending, d, "any") then
        finished = true
        local left = #pending
        pending = {}
        raise("TimeoutError", string.format("%d (of %d) futures unfinished", left, total))
      end
      collect()
    end
  end
end

return M
