--- procpool: process pools with futures for Lua 5.4.
--
-- `ProcessPoolExecutor` (concurrent.futures style) and `Pool`
-- (multiprocessing style) over a C engine: tasks run in worker processes,
-- futures are userdata, every wait goes through one C primitive that can
-- yield inside coroutines (see `set_waiter`).
-- @module procpool
local core = require "procpool.core"
local check = require "procpool.check"
local progress = require "procpool.progress"
local futures = require "procpool.futures"

local M = {}

--- Version of procpool.
M.VERSION = "0.1.0"

M.FIRST_COMPLETED = futures.FIRST_COMPLETED
M.FIRST_EXCEPTION = futures.FIRST_EXCEPTION
M.ALL_COMPLETED = futures.ALL_COMPLETED

local await = core.await
local Executor = core.Executor.__index
local raise, check_opts, deadline_of, is_int = check.raise, check.check_opts, check.deadline_of,
  check.is_int
local check_fn, items_of, context_of, initializer_of = check.check_fn, check.items_of,
  check.context_of, check.initializer_of
local finish, progress_of = futures.finish, progress.reporter

M.is_error = core.is_error
M.serialize = core.serialize
M.deserialize = core.deserialize
M.cpu_count = core.cpu_count
M.current_worker = core.current_worker
M.set_waiter = futures.set_waiter
M.wait = futures.wait
M.as_completed = futures.as_completed

---------------------------------------------------------------------------
-- ProcessPoolExecutor

local EXEC_OPTS = {
  max_workers = true, context = true, initializer = true, initargs = true,
  max_tasks_per_child = true, task_timeout = true, on_worker_lost = true, executable = true,
}

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
    context = ctx.context, executable = ctx.executable, _bootstrap = ctx._bootstrap,
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