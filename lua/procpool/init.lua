--- procpool: process pools with futures for Lua 5.4.
--
-- `ProcessPoolExecutor` (concurrent.futures style) and `Pool`
-- (multiprocessing style) over a C engine: tasks run in worker processes,
-- futures are userdata, every wait goes through one C primitive that can
-- yield inside coroutines (see `set_waiter`).
-- @module procpool
local core = require "procpool.core"

local M = {}

--- Version of procpool.
M.VERSION = "0.1.0"

M.FIRST_COMPLETED = "FIRST_COMPLETED"
M.FIRST_EXCEPTION = "FIRST_EXCEPTION"
M.ALL_COMPLETED = "ALL_COMPLETED"

local now, await = core.monotonic, core.await
local Future = core.Future.__index
local Executor = core.Executor.__index

---------------------------------------------------------------------------
-- helpers

local function raise(name, msg, fields)
  error(core.error(name, msg, fields), 0)
end

local function argerror(n, fname, msg)
  error(string.format("bad argument #%d to '%s' (%s)", n, fname, msg), 3)
end

local function deadline_of(timeout, fname)
  if timeout == nil then return nil end
  if type(timeout) ~= "number" or timeout ~= timeout then
    error(string.format("bad timeout to '%s' (number of seconds expected, got %s)", fname,
      type(timeout)), 3)
  end
  return now() + (timeout > 0 and timeout or 0)
end

local function check_opts(opts, allowed, fname)
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

local function is_int(v) return math.type(v) == "integer" end

local function is_future(v)
  return getmetatable(v) == core.Future
end

local function check_fn(fn, n, fname)
  local t = type(fn)
  if t ~= "function" and t ~= "string" then
    argerror(n, fname, "function or \"module.name\" string expected, got " .. t)
  end
end

--- Iterate an iterable: a sequence table (1..t.n or #t) or a function
-- called until it returns nil. Returns next() -> has, value, and the
-- length when known.
local function items_of(iterable, n, fname)
  local t = type(iterable)
  if t == "table" then
    local len = iterable.n or #iterable
    local i = 0
    return function()
      if i >= len then return false end
      i = i + 1
      return true, iterable[i]
    end, len
  elseif t == "function" then
    local done = false
    return function()
      if done then return false end
      local v = iterable()
      if v == nil then
        done = true
        return false
      end
      return true, v
    end
  end
  argerror(n, fname, "table or iterator function expected, got " .. t)
end

M.is_error = core.is_error
M.serialize = core.serialize
M.deserialize = core.deserialize
M.cpu_count = core.cpu_count
M.current_worker = core.current_worker

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

local function finish(ok, ...)
  if ok then return ... end
  error((...), 0)
end

--- All the values the task returned; raises its error unchanged,
-- `TimeoutError` when not done in time, `CancelledError` if cancelled.
function Future:result(timeout)
  local d = deadline_of(timeout, "result")
  if not await(self, d) then
    raise("TimeoutError", string.format("the future did not finish within %g seconds", timeout))
  end
  return finish(self:_outcome())
end

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

---------------------------------------------------------------------------
-- ProcessPoolExecutor

local EXEC_OPTS = {
  max_workers = true, context = true, initializer = true, initargs = true,
  max_tasks_per_child = true, task_timeout = true, on_worker_lost = true, executable = true,
}

--- Check a context option; returns the engine options for it. The
-- default is "fork", or the environment variable PROCPOOL_CONTEXT.
local function context_of(opts, level)
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
local function initializer_of(opts, level)
  local init = opts.initializer
  if init ~= nil and type(init) ~= "function" and type(init) ~= "string" then
    error("initializer must be a callable (a function or a \"module.name\" string)", level + 1)
  end
  if opts.initargs ~= nil and type(opts.initargs) ~= "table" then
    error("initargs must be a table", level + 1)
  end
  return init
end

--- Create an executor.
-- @tparam[opt] table opts `max_workers`, `context` ("fork"), `initializer`,
--   `initargs`, `max_tasks_per_child`, `task_timeout`, `on_worker_lost`
--   ("replace" or "break").
function M.ProcessPoolExecutor(opts)
  opts = check_opts(opts, EXEC_OPTS, "ProcessPoolExecutor")
  local mw = opts.max_workers
  if mw == nil then mw = core.cpu_count() end
  if not is_int(mw) or mw < 1 then error("max_workers must be greater than 0", 2) end
  local ctx = context_of(opts, 2)
  local init = initializer_of(opts, 2)
  local mt = opts.max_tasks_per_child
  if mt ~= nil and (not is_int(mt) or mt < 1) then
    error("max_tasks_per_child must be an integer >= 1", 2)
  end
  local tt = opts.task_timeout
  if tt ~= nil and (type(tt) ~= "number" or not (tt > 0)) then -- luacheck: ignore 581 (NaN too)
    error("task_timeout must be a number of seconds > 0", 2)
  end
  local owl = opts.on_worker_lost
  if owl ~= nil and owl ~= "replace" and owl ~= "break" then
    error("on_worker_lost must be \"replace\" or \"break\"", 2)
  end
  return core.executor_new({
    max_workers = mw, initializer = init, initargs = opts.initargs,
    max_tasks_per_child = mt, task_timeout = tt, on_worker_lost = owl,
    context = ctx.context, executable = ctx.executable,
  })
end

M.Executor = M.ProcessPoolExecutor

--- Run `fn(...)` in a worker; returns a Future.
function Executor:submit(fn, ...)
  check_fn(fn, 1, "submit")
  return self:_submit(nil, fn, ...)
end

--- As submit, with per-task options: `timeout` (a deadline in seconds;
-- past it the worker is stopped and the future fails with
-- DeadlineExceeded).
function Executor:submit_with(opts, fn, ...)
  opts = check_opts(opts, { timeout = true }, "submit_with")
  local t = opts.timeout
  if t ~= nil and (type(t) ~= "number" or not (t > 0)) then -- luacheck: ignore 581 (NaN too)
    error("bad timeout to 'submit_with' (number of seconds > 0 expected)", 2)
  end
  check_fn(fn, 2, "submit_with")
  return self:_submit(t, fn, ...)
end

--- A progress reporter for map-like iterations: `true` draws a bar on
-- stderr when it is a terminal (silent otherwise); a function is called
-- as `fn(done, total)` (total nil when unknown) at most every 50 ms and
-- once at the end. Returns step(n) and finish(), or nil.
local function progress_of(spec, total, fname)
  if spec == nil or spec == false then return nil end
  local t0, last, done = now(), -1, 0
  local draw
  if spec == true then
    if not core.isatty(2) then return nil end
    draw = function(final)
      local el = now() - t0
      local rate = el > 0 and done / el or 0
      local line
      if total and total > 0 then
        local frac = math.min(1, done / total)
        local w = 30
        local fill = math.floor(frac * w)
        local eta = rate > 0 and (total - done) / rate or 0
        line = string.format("\r[%s%s] %d/%d %3d%% %.0f/s ETA %ds", ("#"):rep(fill),
          ("."):rep(w - fill), done, total, math.floor(frac * 100), rate, math.ceil(eta))
      else
        line = string.format("\r%d done, %.0f/s, %.1fs", done, rate, el)
      end
      io.stderr:write(line, final and "\n" or "")
      io.stderr:flush()
    end
  elseif type(spec) == "function" then
    draw = function() spec(done, total) end
  else
    error("bad progress option to '" .. fname .. "' (true or a function expected)", 4)
  end
  local function step(n)
    done = done + n
    local t = now()
    if t - last >= 0.05 then
      last = t
      draw(false)
    end
  end
  local function finish_bar()
    draw(true)
  end
  return step, finish_bar
end

-- The lazy chunked map behind Executor:map/starmap and Pool:imap/
-- imap_unordered. mode: "stop" (raise the first error, cancel the rest),
-- "continue" (raise an error at its position; iterating again goes on),
-- "unordered" (yield items as their chunks complete, with input indices).
-- task_timeout: each task's deadline (Pool's imap option `timeout`).
local function map_impl(ex, fn, iterable, opts, star, fname, mode, task_timeout)
  check_fn(fn, 1, fname)
  local nexti, len = items_of(iterable, 2, fname)
  local source = type(iterable) == "table" and iterable -- chunks are ranges of it
  opts = check_opts(opts, { timeout = true, chunksize = true, buffersize = true,
    progress = true }, fname)
  local pstep, pfinish = progress_of(opts.progress, len, fname)
  local d = deadline_of(opts.timeout, fname)
  local cs_fixed, bs_fixed = opts.chunksize, opts.buffersize
  if cs_fixed ~= nil and (not is_int(cs_fixed) or cs_fixed < 1) then
    error("chunksize must be >= 1.", 3)
  end
  if bs_fixed ~= nil and (not is_int(bs_fixed) or bs_fixed < 1) then
    error("buffersize must be an integer >= 1", 3)
  end
  local state, broken = ex:_state()
  if state ~= "running" then
    if broken then raise("BrokenProcessPool", broken) end
    raise("InvalidStateError", "cannot schedule new futures after shutdown")
  end
  -- a function that cannot travel fails the call, not every item
  local okfn, fnerr = pcall(core.serialize, fn)
  if not okfn then error(fnerr, 3) end
  local nw = ex:_nworkers()
  -- chunks in input order: { fut, n, pos (items taken), base (input index
  -- before its first), values, failed, upto (items decoded) }; a chunk
  -- whose item could not be sent has no fut and fails at its position
  local chunks, head, tail = {}, 1, 0
  local ahead, exhausted, closed, nread = 0, false, false, 0
  local current -- unordered: the chunk being yielded
  local input_failed, input_error -- the input raised: after what was read

  local function chunksize()
    if cs_fixed then return cs_fixed end
    local ns = ex:_item_ns()
    local cs = ns == 0 and 1 or math.max(1, math.min(4096, 2000000 // ns))
    if len then cs = math.max(1, math.min(cs, -(-len // (4 * nw)))) end
    return cs
  end

  local function push(c)
    tail = tail + 1
    chunks[tail] = c
    nread = nread + c.n
    ahead = ahead + c.n
  end

  -- Submit items[lo..hi] (input positions base+1..); an item that cannot
  -- be serialized becomes a failed chunk of its own, the others still go.
  -- When the pool takes no more work (shut down or broken), the map ends
  -- there: what was submitted is still yielded, then the error is raised
  -- once, as for an input that raises.
  local function submit(items, lo, hi, base)
    local ok, fut = pcall(ex._submit_chunk, ex, fn, items, lo, hi, star, task_timeout, base)
    if ok then
      push({ fut = fut, n = hi - lo + 1, pos = 0, base = base })
    elseif not core.is_error(fut, "SerializationError") then
      input_failed, input_error, exhausted = true, fut, true
    elseif lo == hi then
      push({ n = 1, pos = 0, base = base, failed = { { fut } }, values = {}, upto = 1 })
    else
      for k = lo, hi do
        if exhausted then return end
        submit(items, k, k, base + (k - lo))
      end
    end
  end

  local function fill()
    while not exhausted do
      local cs = chunksize()
      if ahead >= (bs_fixed or 4 * nw * cs) then return end
      if source then
        local k = math.min(cs, len - nread)
        if k <= 0 then
          exhausted = true
          return
        end
        submit(source, nread + 1, nread + k, nread)
      else
        local items, k = {}, 0
        while k < cs do
          local okn, has, v = pcall(nexti)
          if not okn then -- raised where iteration reaches it
            input_failed, input_error = true, has
            exhausted = true
            break
          end
          if not has then
            exhausted = true
            break
          end
          k = k + 1
          items[k] = v
        end
        if k == 0 then return end
        submit(items, 1, k, nread)
      end
    end
  end

  local finished = false
  local function cancel_rest()
    if pfinish and not finished then
      finished = true
      pfinish()
    end
    closed = true
    for i = head, tail do
      local c = chunks[i]
      if c and c.fut then c.fut:cancel() end
      chunks[i] = nil
    end
    head, tail, current = 1, 0, nil
  end

  local function timed_out()
    cancel_rest()
    raise("TimeoutError", string.format("%s did not finish within %g seconds", fname,
      opts.timeout))
  end

  -- whether the chunk's next item can be taken without waiting
  local function ready(c)
    if c.upto and c.pos < c.upto then return true end
    local f = c.fut
    return f:done() or f:_item_ready(c.pos + 1)
  end

  -- the chunk's next item (it is in): results are decoded as a run of
  -- all the items that are in, the whole chunk once it is done
  local function take(c)
    local pos = c.pos + 1
    if not c.upto or pos > c.upto then c.values, c.failed, c.upto = c.fut:_values(pos) end
    c.pos = pos
    ahead = ahead - 1
    local failed = c.failed and c.failed[pos]
    local v = c.values[pos]
    c.values[pos] = nil -- what was yielded is the caller's to keep or drop
    if pstep then pstep(1) end
    if failed then
      if mode == "stop" then cancel_rest() end
      error(failed[1], 0)
    end
    return c.base + pos, v
  end

  -- the fast path, per item: the chunk's next item when it is decoded,
  -- did not fail and is not the chunk's last (nothing else to do then);
  -- nil otherwise. It repeats take's bookkeeping inline, in step with it:
  -- a shared helper measured 10-20% slower on imap_unordered of no-ops.
  local function take_decoded(c)
    local pos = c.pos + 1
    if pos < c.n and pos <= (c.upto or 0) and not c.failed then
      c.pos = pos
      ahead = ahead - 1
      local values = c.values
      local v = values[pos]
      values[pos] = nil -- what was yielded is the caller's to keep or drop
      if pstep then pstep(1) end
      return c.base + pos, v
    end
  end

  local function ordered()
    local c = chunks[head]
    if c then
      local i, v = take_decoded(c)
      if i then return i, v end
    end
    if closed then return nil end
    fill()
    c = chunks[head]
    if not c then
      cancel_rest()
      if input_failed then error(input_error, 0) end
      return nil
    end
    if not ready(c) and not await(c.fut, d, c.pos + 1) then timed_out() end
    if c.pos + 1 == c.n then
      chunks[head] = nil
      head = head + 1
    end
    return take(c)
  end

  -- the first chunk whose next item is in
  local function find_ready()
    for i = head, tail do
      if ready(chunks[i]) then return chunks[i] end
    end
  end

  local function unordered()
    local c = current
    if c then
      local i, v = take_decoded(c)
      if i then return i, v end
    end
    if closed then return nil end
    if not (c and c.pos < c.n and ready(c)) then
      current = nil
      fill()
      if head > tail then
        cancel_rest()
        if input_failed then error(input_error, 0) end
        return nil
      end
      c = find_ready()
      if not c then
        local list, pos = {}, {}
        for i = head, tail do
          list[#list + 1] = chunks[i].fut
          pos[#pos + 1] = chunks[i].pos + 1
        end
        if not await(list, d, pos) then timed_out() end
        c = find_ready()
      end
      current = c
    end
    if c.pos + 1 == c.n then -- its last item: the chunk leaves the list
      for i = head, tail do
        if chunks[i] == c then
          table.remove(chunks, i)
          tail = tail - 1
          break
        end
      end
    end
    return take(c)
  end

  local closer = setmetatable({}, { __close = function() cancel_rest() end })
  return mode == "unordered" and unordered or ordered, nil, nil, closer
end

--- Lazy parallel map: `for i, v in ex:map(fn, items) do`. Yields `i, v`
-- in input order; raises the first task error when iteration reaches it.
-- @tparam[opt] table opts `timeout` (whole map), `chunksize`, `buffersize`.
function Executor:map(fn, iterable, opts)
  return map_impl(self, fn, iterable, opts, false, "map", "stop")
end

--- As `map`, each item a table of arguments.
function Executor:starmap(fn, iterable, opts)
  return map_impl(self, fn, iterable, opts, true, "starmap", "stop")
end

-- Wait until the executor's workers have exited (after _shutdown or
-- _kill), reap them, and run the done callbacks that are due.
local function join(ex)
  await(ex, nil)
  ex:_join()
  core.drain()
end

--- Shut down: `wait` (default true) blocks until all work is done and the
-- workers have exited; `cancel_futures` cancels tasks not yet started.
function Executor:shutdown(opts)
  opts = check_opts(opts, { wait = true, cancel_futures = true }, "shutdown")
  self:_shutdown(opts.cancel_futures == true)
  if opts.wait ~= false then
    join(self)
  else
    core.drain()
  end
end

function Executor:close()
  self:shutdown()
end

local function stop(self, sig)
  self:_kill(sig)
  join(self)
end

--- Send SIGTERM to every worker; unfinished futures fail with
-- BrokenProcessPool; the executor is shut down.
function Executor:terminate_workers() stop(self, 15) end

--- As terminate_workers, with SIGKILL.
function Executor:kill_workers() stop(self, 9) end

-- Leaving a `<close>` scope normally waits for every task (shutdown);
-- leaving it by an error (Ctrl-C's "interrupted!" included) stops the
-- work: pending tasks are cancelled, running ones fail as their workers
-- are killed, and the workers are reaped before the error goes on.
local function abandon(ex)
  if ex:_state() == "dead" then return end
  ex:_shutdown(true)
  stop(ex, 9)
end

core.Executor.__close = function(self, err)
  if err ~= nil then abandon(self) else self:shutdown() end
end

-- what the Pool module shares with this one
local internal = {
  raise = raise, check_opts = check_opts, deadline_of = deadline_of, is_int = is_int,
  check_fn = check_fn, items_of = items_of, map_impl = map_impl, finish = finish,
  progress_of = progress_of, context_of = context_of, initializer_of = initializer_of,
  abandon = abandon, join = join,
}
M.Pool = require("procpool.pool")(M, internal)
core.Executor.__tostring = function(self)
  return string.format("procpool.Executor: %s (%d workers)", (self:_state()), self:_nworkers())
end

return M
