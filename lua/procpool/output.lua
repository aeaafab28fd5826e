--- procpool.output: the `output` option: where a task's stdout and
-- stderr go, and what becomes of captured output.
--
-- With `output = "capture"` (an executor's or Pool's, or one call's), a
-- worker sends what each task wrote back with its result (src/capture.c);
-- `Future:output()` returns it. The maps hand each item's output to an
-- `on_output(index, stdout, stderr)` callback, or write it grouped: the
-- item's stdout to io.stdout, then its stderr to io.stderr, together, as
-- the item's result is delivered (`emitter`).
-- @module procpool.output
local check = require "procpool.check"

local M = {}

local size_of = check.size_of

-- the limit per stream per task: the worker's capture area holds both
-- streams, lengths travel as u32
local MAX_OUTPUT = 1024 ^ 3

--- Check the `output` and `max_output` options of an executor or a Pool
-- (at `level` for the error); returns them for `core.executor_new`:
-- "inherit" or "capture" (nil: inherit), and max_output in bytes (nil:
-- the default, 1 MiB).
function M.options_of(opts, level)
  local out = opts.output
  if out ~= nil and out ~= "inherit" and out ~= "capture" then
    error("output must be \"inherit\" or \"capture\", got " .. tostring(out), level + 1)
  end
  local mo = opts.max_output
  if mo ~= nil then
    local n, why = size_of(mo)
    if not n then error("bad max_output: " .. why, level + 1) end
    if n > MAX_OUTPUT then error("max_output must be at most 1G", level + 1) end
    mo = n
  end
  return out, mo
end

--- One call's `output` option: true (capture), false (inherit) or nil
-- (not given: the executor's).
function M.capture_of(v, fname, level)
  if v == nil then return nil end
  if v ~= "inherit" and v ~= "capture" then
    error(string.format("bad output to '%s' (\"inherit\" or \"capture\" expected, got %s)", fname,
      tostring(v)), level + 1)
  end
  return v == "capture"
end

--- Check an `on_output` option (nil or a function).
function M.check_on_output(fn, level)
  if fn ~= nil and type(fn) ~= "function" then
    error("on_output must be a function(index, stdout, stderr)", level + 1)
  end
end

-- Write one item's output grouped: its stdout, flushed, then its stderr,
-- so that no other item's output comes between them.
local function write_grouped(_, out, err)
  if out and out ~= "" then
    io.stdout:write(out)
    io.stdout:flush()
  end
  if err and err ~= "" then io.stderr:write(err) end
end

--- The function a map calls with each item's `index, stdout, stderr`:
-- `on_output`, or the grouped writer.
function M.emitter(on_output)
  return on_output or write_grouped
end

return M
