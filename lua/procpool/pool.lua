--- procpool.pool: the multiprocessing.Pool face of procpool.
-- A thin layer over an executor: every call becomes chunk jobs on the
-- same engine, and every wait the same C primitive. `Pool` (the
-- constructor) and `AsyncResult` (the class of its async results).
-- @module procpool.pool
local core = require "procpool.core"
local check = require "procpool.check"
local map = require "procpool.map"
local progress = require "procpool.progress"
local progress_of, listener_of = progress.reporter, progress.listener
local futures = require "procpool.futures"
local executor = require "procpool.executor"
local output = require "procpool.output"
local hosts = require "procpool.hosts"

local M = {}

local raise, check_opts, deadline_of, is_int = check.raise, check.check_opts, check.deadline_of,
  check.is_int
local check_fn, items_of, context_of, initializer_of = check.check_fn, check.items_of,
  check.context_of, check.initializer_of
local finish, iterate = futures.finish, map.iterate
local join, abandon = executor.join, executor.abandon
local await = core.await
-- (locals, not globals: apply_async and get use them once per task)
local setmetatable, select, unpack, pack = setmetatable, select, table.unpack, table.pack

---------------------------------------------------------------------
-- AsyncResult

local AsyncResult = {}
AsyncResult.__index = AsyncResult
AsyncResult.__name = "procpool.AsyncResult"

-- An apply's result has its one future in _fut, and get() returns its
-- values; a map's has its chunk futures in _futs, and get() returns the
-- list (field n).
-- Hand on the captured output of the items of futs[1..k] not handed on
-- yet (r._emit: the output's emitter; nil without capture).
local function emit_upto(r, k)
  local emit = r._emit
  if not emit then return end
  local base, futs = r._emit_base or 0, r._futs or { r._fut }
  for i = (r._emitted or 0) + 1, k do
    local f = futs[i]
    local n = f:_nitems()
    for j = 1, n do emit(base + j, f:_output(j)) end
    base = base + n
    r._emitted = i
  end
  r._emit_base = base
end

-- An apply's outcome, decoded once and kept in the result itself: _ok,
-- _value (its one value, or the error), _vals (a pack, for any other
-- number of values). The future's own cache (_outcome) is not used: it
-- costs a table and a weak-table entry per task.
local function keep_apply(r, ok, ...)
  r._ok = ok
  if ok and select("#", ...) ~= 1 then r._vals = pack(...) else r._value = ... end
  return ok, ...
end

-- get()'s first look at the outcome: kept, then the values returned or
-- the error raised (keep_apply and finish in one call)
local function settle(r, ok, ...)
  r._ok = ok
  if not ok then
    r._value = ...
    error((...), 0)
  end
  if select("#", ...) ~= 1 then r._vals = pack(...) else r._value = ... end
  return ...
end

-- true, values... | false, error
local function apply_outcome(r)
  local ok = r._ok
  if ok == nil then return keep_apply(r, r._fut:_item(1, true)) end
  local vals = r._vals
  if vals then return true, unpack(vals, 1, vals.n) end
  return ok, r._value
end

local function deliver(callback, error_callback, ok, ...)
  if ok then
    if callback then callback(...) end
  elseif error_callback then
    error_callback((...))
  end
end

-- Run callback / error_callback once every one of futs is done.
local function watch(r, futs, callback, error_callback)
  local left = #futs
  local function on_done()
    left = left - 1
    if left > 0 then return end
    emit_upto(r, #futs)
    if r._fut then
      deliver(callback, error_callback, apply_outcome(r))
    else
      deliver(callback, error_callback, r:_outcome())
    end
  end
  if left == 0 then -- an empty map is done at once
    left = 1
    on_done()
  else
    for _, f in ipairs(futs) do f:add_done_callback(on_done) end
  end
end

-- A map's result over its chunk futures (n items).
local function new_result(futs, n, callback, error_callback, emit)
  local r = setmetatable({ _futs = futs, _n = n, _emit = emit }, AsyncResult)
  if callback or error_callback then watch(r, futs, callback, error_callback) end
  return r
end

--- True once the result is available.
function AsyncResult:ready()
  if self._fut then return self._fut:done() end
  for _, f in ipairs(self._futs) do
    if not f:done() then return false end
  end
  return true
end

--- Wait up to `timeout` seconds; returns ready().
function AsyncResult:wait(timeout)
  local d = deadline_of(timeout, "wait")
  if self._fut then
    await(self._fut, d)
  elseif #self._futs > 0 then
    await(self._futs, d, "all")
  end
  return self:ready()
end

-- true, value | false, error (computed once, cached); an apply's value
-- is its first
function AsyncResult:_outcome()
  if self._fut then
    local ok, v = apply_outcome(self)
    return ok, v
  end
  if self._ok ~= nil then return self._ok, self._value end
  local out, base = { n = self._n }, 1
  self._ok, self._value = true, out
  for _, f in ipairs(self._futs) do
    local idx, err = f:_collect(out, base)
    if idx then
      self._ok, self._value = false, err
      break
    end
    base = base + f:_nitems()
  end
  return self._ok, self._value
end

--- The result: the values (apply_async) or the list (map_async). Raises
-- the first task error, or TimeoutError when not ready in time.
-- (core.fast_get answers an apply's commonest case in C, before this runs:
-- a bad timeout is its caller's, at level 4)
AsyncResult.get = core.fast_get(function(self, timeout)
  local d = timeout ~= nil and deadline_of(timeout, "get", 4) or nil
  local fut = self._fut
  if fut then -- apply: one future, its own wait and values
    if not await(fut, d) then
      raise("TimeoutError", string.format("the result was not ready within %g seconds", timeout))
    end
    if self._emit then emit_upto(self, 1) end
    if self._ok == nil then return settle(self, fut:_item(1, true)) end
    return finish(apply_outcome(self))
  end
  if self._ok == nil then
    -- collect each chunk as it completes: decoding overlaps the work
    -- still running (and every chunk finishes before an error is raised)
    local out, err = self._partial, self._err
    if not out then
      out = core.table_new(self._n, 1) -- the whole list at once: no regrowing
      out.n = self._n
    end
    self._partial = out
    local futs = self._futs
    local k, base = self._next or 1, self._base or 1
    while k <= #futs do
      local f = futs[k]
      if not await(f, d) then
        self._next, self._base, self._err = k, base, err
        raise("TimeoutError", string.format("the result was not ready within %g seconds",
          timeout))
      end
      if not err then
        local idx, e = f:_collect(out, base)
        if idx then err = { e } end
      end
      if self._pstep then self._pstep(f:_nitems(), base) end
      base = base + f:_nitems()
      if self._emit then emit_upto(self, k) end
      k = k + 1
    end
    if self._pfinish then self._pfinish() end
    self._ok, self._value = not err, err and err[1] or out
  end
  if #self._futs > 0 and not await(self._futs, d, "all") then
    raise("TimeoutError", string.format("the result was not ready within %g seconds", timeout))
  end
  local ok, v = self:_outcome()
  if not ok then error(v, 0) end
  return v
end)

local function apply_future(self, fname)
  if not self._fut then
    raise("InvalidStateError", fname .. " is for apply_async results (a map's items report " ..
      "to its on_report option)")
  end
  return self._fut
end

--- apply_async: `cb(r, ...)` with each report of the task
-- (procpool.report), as Future:add_progress_callback.
function AsyncResult:add_progress_callback(cb)
  if type(cb) ~= "function" then
    error("bad argument #1 to 'add_progress_callback' (function expected, got " .. type(cb) .. ")", 2)
  end
  apply_future(self, "add_progress_callback"):add_progress_callback(function(_, ...) cb(self, ...) end)
end

--- apply_async: the values of the task's latest report (none before one).
function AsyncResult:progress()
  return apply_future(self, "progress"):progress()
end

--- Whether the call completed without raising; an error before ready().
function AsyncResult:successful()
  if not self:ready() then
    raise("InvalidStateError", "the result is not ready")
  end
  return (self:_outcome())
end

---------------------------------------------------------------------
-- An apply's result without callbacks or captured output: its task's
-- Future itself, under the metatable core.AsyncResult (src/future.c), so
-- that a call costs no table. Same methods, same behaviour as the table
-- kind above; the outcome is the Future's own (decoded once, kept).

local Future = core.Future.__index
local ApplyResult = core.AsyncResult.__index
local done = Future.done

ApplyResult.ready = done

function ApplyResult:wait(timeout)
  await(self, deadline_of(timeout, "wait"))
  return done(self)
end

-- (core.fast_result answers a done task's one value in C first: a bad
-- timeout is its caller's, at level 4)
ApplyResult.get = core.fast_result(function(self, timeout)
  local d = timeout ~= nil and deadline_of(timeout, "get", 4) or nil
  if not await(self, d) then
    raise("TimeoutError", string.format("the result was not ready within %g seconds", timeout))
  end
  return finish(self:_outcome())
end)

function ApplyResult:successful()
  if not done(self) then raise("InvalidStateError", "the result is not ready") end
  return (self:_outcome())
end

function ApplyResult:add_progress_callback(cb)
  if type(cb) ~= "function" then
    error("bad argument #1 to 'add_progress_callback' (function expected, got " .. type(cb) .. ")", 2)
  end
  Future.add_progress_callback(self, cb) -- (its first argument is this result)
end

ApplyResult.progress = Future.progress
ApplyResult._outcome = Future._outcome

---------------------------------------------------------------------
-- Pool

local Pool = {}
Pool.__index = Pool
Pool.__name = "procpool.Pool"

local POOL_OPTS = {
  processes = true, initializer = true, initargs = true, maxtasksperchild = true,
  context = true, executable = true, limits = true, output = true, max_output = true,
  hosts = true, launcher = true, host_timeout = true, start_timeout = true, remote = true,
  workers_per_host = true, reconnect = true,
}

--- Create a pool; its workers start at once.
-- @tparam[opt] table opts `processes`, `initializer`, `initargs`,
--   `maxtasksperchild`, `context` ("fork"), `limits` (as ProcessPoolExecutor's),
--   `output` ("inherit" or "capture"), `max_output` (bytes kept per stream
--   per task).
function M.Pool(opts)
  opts = check_opts(opts, POOL_OPTS, "Pool")
  local on_hosts, host_opts = hosts.hosts_of(opts, "Pool", 2)
  local n = opts.processes
  if n == nil then n = core.cpu_count() end
  if not is_int(n) or n < 1 then error("Number of processes must be at least 1", 2) end
  local mt = opts.maxtasksperchild
  if mt ~= nil and (not is_int(mt) or mt < 1) then
    error("maxtasksperchild must be a positive integer or nil", 2)
  end
  local ctx = on_hosts and {} or context_of(opts, 2)
  local init = initializer_of(opts, 2)
  local limits = check.limits_of(opts.limits, "Pool", 2)
  local out, max_output = output.options_of(opts, 2)
  local ex = core.executor_new(hosts.core_opts({
    max_workers = n, initializer = init, initargs = opts.initargs, max_tasks_per_child = mt,
    context = ctx.context, executable = ctx.executable, limits = limits,
    output = out, max_output = max_output,
  }, on_hosts, host_opts))
  if on_hosts then n = ex:_nworkers() end
  return setmetatable({ _ex = ex, _state = "RUN", _processes = n, _capture = out == "capture" },
    Pool)
end

local function running(self)
  if self._state ~= "RUN" then raise("InvalidStateError", "Pool not running") end
  local st, broken = self._ex:_state()
  if broken then raise("BrokenProcessPool", broken) end
  if st ~= "running" then raise("InvalidStateError", "Pool not running") end
end

local function check_timeout(t, fname)
  if t ~= nil and (type(t) ~= "number" or not (t > 0)) then -- luacheck: ignore 581 (NaN too)
    error("bad timeout to '" .. fname .. "' (a task deadline in seconds > 0 expected)", 3)
  end
end

local function check_cb(cb, name)
  if cb ~= nil and type(cb) ~= "function" then error(name .. " must be a function", 3) end
end

local APPLY_OPTS = { callback = true, error_callback = true, timeout = true }

--- fn(table.unpack(args)) in a worker; an AsyncResult.
-- @tparam[opt] table opts `callback(...)`, `error_callback(err)`,
--   `timeout` (the task's deadline: past it the worker is stopped and the
--   call fails with DeadlineExceeded).
function Pool:apply_async(fn, args, opts)
  -- the executor's own state (broken, shut down) is checked by its submit,
  -- under the engine's lock it takes anyway: one lock per call, not three
  if self._state ~= "RUN" then raise("InvalidStateError", "Pool not running") end
  local tf = type(fn)
  if tf ~= "function" and tf ~= "string" then check_fn(fn, 1, "apply_async") end
  if args ~= nil and type(args) ~= "table" then
    error("bad argument #2 to 'apply_async' (table of arguments expected, got " .. type(args) .. ")", 2)
  end
  local timeout, callback, error_callback
  if opts ~= nil then -- (no option table is built or checked per call without one)
    opts = check_opts(opts, APPLY_OPTS, "apply_async")
    timeout, callback, error_callback = opts.timeout, opts.callback, opts.error_callback
    check_cb(callback, "callback")
    check_cb(error_callback, "error_callback")
    check_timeout(timeout, "apply_async")
  end
  local f
  if args then
    local n = args.n or #args
    if n == 1 then -- the usual one argument, without a call to unpack
      f = self._ex:_submit(timeout, fn, args[1])
    else
      f = self._ex:_submit(timeout, fn, unpack(args, 1, n))
    end
  else
    f = self._ex:_submit(timeout, fn)
  end
  if not (self._capture or callback or error_callback) then return core._apply_result(f) end
  -- the result: no list of one future, and one field (get adds the
  -- outcome's)
  local r = setmetatable({ _fut = f }, AsyncResult)
  if self._capture then r._emit = output.emitter(nil) end
  if callback or error_callback then watch(r, { f }, callback, error_callback) end
  return r
end
Pool.apply_async = core.fast_apply(Pool.apply_async)

--- fn(table.unpack(args)), blocking; its values.
function Pool:apply(fn, args)
  return self:apply_async(fn, args):get()
end

local function list_of(iterable, fname)
  if type(iterable) == "table" then return iterable, iterable.n or #iterable end
  local nexti = items_of(iterable, 2, fname)
  local list, n = {}, 0
  while true do
    local has, v = nexti()
    if not has then break end
    n = n + 1
    list[n] = v
  end
  return list, n
end

local MAP_ASYNC_OPTS = map.with_item_opts {
  chunksize = true, callback = true, error_callback = true, timeout = true,
}
local MAP_OPTS = map.with_item_opts { chunksize = true }
local IMAP_OPTS = map.with_item_opts { chunksize = true, timeout = true }

local function map_async(self, fn, iterable, opts, star, fname)
  running(self)
  check_fn(fn, 1, fname)
  opts = check_opts(opts, MAP_ASYNC_OPTS, fname)
  local capture = output.capture_of(opts.output, fname, 3)
  if capture == nil then capture = self._ex:_capture() end
  output.check_on_output(opts.on_output, 3)
  check_cb(opts.callback, "callback")
  check_cb(opts.error_callback, "error_callback")
  check_timeout(opts.timeout, fname)
  local list, n = list_of(iterable, fname)
  local pstep, pfinish, preport = progress_of(opts.progress, n, fname)
  local listen = listener_of(opts.on_report, preport, fname)
  local cs = opts.chunksize
  if cs == nil then
    cs = -(-n // (4 * self._processes)) -- CPython's rule
  elseif not is_int(cs) or cs < 1 then
    error("chunksize must be >= 1", 3)
  end
  local futs = {}
  for lo = 1, n, math.max(cs, 1) do
    local ok, f = pcall(self._ex._submit_chunk, self._ex, fn, list, lo, math.min(lo + cs - 1, n),
      star, opts.timeout, nil, listen and function(_, k, ...) listen(lo + k - 1, ...) end,
      capture)
    if not ok then -- an item that cannot be sent: the call fails, nothing stays queued
      for _, g in ipairs(futs) do g:cancel() end
      error(f, 3)
    end
    futs[#futs + 1] = f
  end
  local r = new_result(futs, n, opts.callback, opts.error_callback,
    capture and output.emitter(opts.on_output) or nil)
  r._pstep, r._pfinish, r._listen = pstep, pfinish, listen
  return r
end

-- map and starmap: the list, and the chunks' futures let go of at once
-- (their results were taken; no one else has them): see Future:_release.
-- Not with a listener, whose reports are delivered by future.
local function got(r)
  local list = r:get()
  if not r._listen then
    for _, f in ipairs(r._futs) do f:_release() end
    r._futs = {}
  end
  return list
end

-- the chunksize argument of map/starmap: a number, or a table of
-- chunksize and the item options (map.with_item_opts)
local function map_opts(arg, fname)
  if type(arg) == "table" then return check_opts(arg, MAP_OPTS, fname) end
  return { chunksize = arg }
end

--- A list of fn's first return values, in order, with field n. The third
-- argument is a chunksize or a table { chunksize, progress, output,
-- on_output, on_report }.
function Pool:map(fn, list, chunksize)
  return got(map_async(self, fn, list, map_opts(chunksize, "map"), false, "map"))
end

--- As map, without blocking: an AsyncResult whose get() is the list.
-- @tparam[opt] table opts `chunksize`, `callback(list)`,
--   `error_callback(err)`, `timeout` (each task's deadline).
function Pool:map_async(fn, list, opts)
  return map_async(self, fn, list, opts, false, "map_async")
end

--- As map, each item a table of arguments.
function Pool:starmap(fn, list, chunksize)
  return got(map_async(self, fn, list, map_opts(chunksize, "starmap"), true, "starmap"))
end

function Pool:starmap_async(fn, list, opts)
  return map_async(self, fn, list, opts, true, "starmap_async")
end

-- chunksize, or an options table of chunksize, timeout (each task's
-- deadline, as in the async calls) and the item options
local function imap(self, fn, iterable, opts, fname, mode)
  running(self)
  local shown, timeout, out, on_output, on_report
  if type(opts) == "table" then
    opts = check_opts(opts, IMAP_OPTS, fname)
    shown, timeout, out, on_output, on_report = opts.progress, opts.timeout, opts.output,
      opts.on_output, opts.on_report
    check_timeout(timeout, fname)
    opts = opts.chunksize
  end
  if opts ~= nil and (not is_int(opts) or opts < 1) then
    error("chunksize must be >= 1", 3)
  end
  return iterate(self._ex, fn, iterable, { chunksize = opts or 1, progress = shown,
    output = out, on_output = on_output, on_report = on_report }, false, fname, mode, timeout)
end

--- Lazy map: yields i, v in input order. A task error is raised at its
-- position; calling the iterator again carries on after it. The third
-- argument is a chunksize (default 1) or a table { chunksize, progress,
-- timeout } (timeout: each task's deadline, DeadlineExceeded past it).
function Pool:imap(fn, iterable, chunksize)
  return imap(self, fn, iterable, chunksize, "imap", "continue")
end

--- Lazy map yielding i, v as results complete (i: the input index).
function Pool:imap_unordered(fn, iterable, chunksize)
  return imap(self, fn, iterable, chunksize, "imap_unordered", "unordered")
end

--- No more work: the workers exit once the queue is drained.
function Pool:close()
  if self._state == "RUN" then
    self._state = "CLOSE"
    self._ex:_shutdown(false)
  end
end

--- Stop the workers at once; unfinished results fail.
function Pool:terminate()
  if self._state ~= "TERMINATE" then
    self._state = "TERMINATE"
    self._ex:_kill(15)
  end
end

--- The counters of the pool's executor (ProcessPoolExecutor's stats).
function Pool:stats() return self._ex:stats() end

--- Wait for the workers to exit (after close or terminate).
function Pool:join()
  if self._state == "RUN" then raise("InvalidStateError", "Pool is still running") end
  join(self._ex)
end

-- as the executor's: a normal exit waits for the work, an error stops it
Pool.__close = function(self, err)
  if err ~= nil then
    self._state = "TERMINATE"
    abandon(self._ex)
    return
  end
  self:close()
  self:join()
end

Pool.__tostring = function(self)
  return string.format("procpool.Pool: %s (%d processes)", self._state:lower(), self._processes)
end

M.AsyncResult = AsyncResult

return M
