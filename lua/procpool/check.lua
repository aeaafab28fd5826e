--- procpool.check: the argument and option checks the Lua layer shares.
--
-- Every public call checks what it is given before any work starts; the
-- checks and their messages live here, once. A message's level counts
-- from the function that calls the check (as `error`'s does), so it names
-- the caller's caller where a public call checks its own arguments.
-- @module procpool.check
local core = require "procpool.core"

local M = {}

local now = core.monotonic

--- Raise one of procpool's error objects (`procpool.is_error`).
function M.raise(name, msg, fields)
  error(core.error(name, msg, fields), 0)
end

--- Raise "bad argument #n to 'fname' (msg)".
function M.argerror(n, fname, msg)
  error(string.format("bad argument #%d to '%s' (%s)", n, fname, msg), 3)
end

--- The deadline (on `core.monotonic`'s clock) of a timeout in seconds;
-- nil for none. A negative timeout counts as 0. A bad one is blamed on
-- the caller of `fname` (`level`, as error's, from here: 3 by default;
-- 4 for a method called through a C wrapper).
function M.deadline_of(timeout, fname, level)
  if timeout == nil then return nil end
  if type(timeout) ~= "number" or timeout ~= timeout then
    error(string.format("bad timeout to '%s' (number of seconds expected, got %s)", fname,
      type(timeout)), level or 3)
  end
  return now() + (timeout > 0 and timeout or 0)
end

--- An options table (`{}` for nil) whose keys are all in `allowed`.
function M.check_opts(opts, allowed, fname)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(string.format("bad argument to '%s' (options table expected, got %s)", fname,
      type(opts)), 3)
  end
  for k in pairs(opts) do
    if not allowed[k] then
      error(string.format("unknown option '%s' to '%s'", tostring(k), fname), 3)
    end
  end
  return opts
end

function M.is_int(v) return math.type(v) == "integer" end

function M.is_future(v)
  return getmetatable(v) == core.Future
end

--- A task function: a function or a "module.name" string.
function M.check_fn(fn, n, fname)
  local t = type(fn)
  if t ~= "function" and t ~= "string" then
    M.argerror(n, fname, "function or \"module.name\" string expected, got " .. t)
  end
end

--- Iterate an iterable: a sequence table (1..t.n or #t) or a function
-- called until it returns nil. Returns next() -> true, value (nil at the
-- end), and the length when known.
function M.items_of(iterable, n, fname)
  local t = type(iterable)
  if t == "table" then
    local len = iterable.n or #iterable
    local i = 0
    return function()
      if i >= len then return nil end
      i = i + 1
      return true, iterable[i]
    end, len
  elseif t == "function" then
    local done = false
    return function()
      if done then return nil end
      local v = iterable()
      if v == nil then
        done = true
        return nil
      end
      return true, v
    end
  end
  M.argerror(n, fname, "table or iterator function expected, got " .. t)
end

--- Check a context option; returns the engine options for it. The
-- default is "fork", or the environment variable PROCPOOL_CONTEXT.
function M.context_of(opts, level)
  local ctx = opts.context or os.getenv("PROCPOOL_CONTEXT") or "fork"
  if ctx ~= "fork" and ctx ~= "spawn" then
    error("unknown context '" .. tostring(ctx) .. "' (supported: \"fork\", \"spawn\")", level + 1)
  end
  local exe = opts.executable
  if exe ~= nil and (type(exe) ~= "string" or exe == "") then
    error("executable must be a command name or path", level + 1)
  end
  if ctx == "fork" then return { context = "fork" } end
  -- a fresh interpreter, which finds procpool with our package.path and
  -- package.cpath, becomes the zygote
  return { context = "spawn", executable = exe or "lua5.4" }
end

--- Check the initializer and initargs options; returns the initializer.
function M.initializer_of(opts, level)
  local init = opts.initializer
  if init ~= nil and type(init) ~= "function" and type(init) ~= "string" then
    error("initializer must be a callable (a function or a \"module.name\" string)", level + 1)
  end
  if opts.initargs ~= nil and type(opts.initargs) ~= "table" then
    error("initargs must be a table", level + 1)
  end
  return init
end

local UNITS = { [""] = 1, K = 1024, M = 1024 ^ 2, G = 1024 ^ 3, T = 1024 ^ 4 }

--- A size in bytes: an integer, or a string of a number and a unit of
-- 1024 (K, M, G, T; "512M", "1.5G", "64KiB", "100B"). Returns the whole
-- number of bytes, or nil and why.
function M.size_of(v)
  if M.is_int(v) then
    if v < 0 then return nil, "a size cannot be negative" end
    return v
  end
  if type(v) == "number" and v >= 0 and v == math.floor(v) and v < 2 ^ 63 then
    return math.tointeger(v)
  end
  if type(v) ~= "string" then
    return nil, "bytes (an integer) or a size string such as \"512M\" expected, got " .. type(v)
  end
  local num, unit = v:match("^%s*(%d+%.?%d*)%s*([KMGTkmgt]?)i?[Bb]?%s*$")
  if not num then return nil, "cannot read '" .. v .. "' as a size (e.g. \"512M\", \"2G\")" end
  local n = math.floor(tonumber(num) * UNITS[unit:upper()])
  if n >= 2 ^ 63 then return nil, "size '" .. v .. "' is too large" end
  return math.tointeger(n)
end

local LIMIT_KEYS = { memory = true, cpu = true, nofile = true, nice = true }
-- the fds a worker holds itself: stdio, its channel, pipes and payloads
local MIN_NOFILE = 16

--- Check the `limits` option; returns it normalized (memory in bytes,
-- all whole numbers) or nil. `fname` names the call, for messages.
function M.limits_of(lim, fname, level)
  level = level + 1
  if lim == nil then return nil end
  if type(lim) ~= "table" then
    error("limits must be a table { memory =, cpu =, nofile =, nice = }", level)
  end
  for k in pairs(lim) do
    if not LIMIT_KEYS[k] then
      error(string.format("unknown limit '%s' to '%s' (known: memory, cpu, nofile, nice)",
        tostring(k), fname), level)
    end
  end
  local out = {}
  if lim.memory ~= nil then
    local n, why = M.size_of(lim.memory)
    if not n then error("limits.memory: " .. why, level) end
    if n < 1024 * 1024 then error("limits.memory must be at least 1M", level) end
    out.memory = n
  end
  local cpu = lim.cpu
  if cpu ~= nil then
    if not M.is_int(cpu) or cpu < 1 then
      error("limits.cpu must be a whole number of seconds >= 1 (the kernel counts CPU time in "
        .. "seconds)", level)
    end
    out.cpu = cpu
  end
  local nf = lim.nofile
  if nf ~= nil then
    if not M.is_int(nf) or nf < MIN_NOFILE then
      error("limits.nofile must be an integer >= " .. MIN_NOFILE, level)
    end
    local _, hard = core.rlimit_nofile()
    if hard and nf > hard then
      error(string.format("limits.nofile = %d is above this process's hard limit (%d)", nf,
        hard), level)
    end
    out.nofile = nf
  end
  local nice = lim.nice
  if nice ~= nil then
    if not M.is_int(nice) or nice < 0 or nice > 19 then
      error("limits.nice must be an integer from 0 to 19 (added to the workers' niceness)", level)
    end
    out.nice = nice
  end
  return out
end

return M
