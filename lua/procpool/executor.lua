--- procpool.executor: the ProcessPoolExecutor (concurrent.futures style).
--
-- Completes the Executor userdata made in src/executor.c
-- (`core.Executor`), which holds the engine, the workers and the private
-- methods (`_submit`, `_submit_chunk`, `_shutdown`, ...): this file adds
-- the constructor's option checks, the public methods and `__close`.
-- @module procpool.executor
local core = require "procpool.core"
local check = require "procpool.check"
local map = require "procpool.map"
local output = require "procpool.output"
local hosts = require "procpool.hosts"

local M = {}

local await = core.await
local check_opts, is_int, check_fn = check.check_opts, check.is_int, check.check_fn
local context_of, initializer_of = check.context_of, check.initializer_of
local limits_of = check.limits_of
local Executor = core.Executor.__index

local EXEC_OPTS = {
  max_workers = true, context = true, initializer = true, initargs = true,
  max_tasks_per_child = true, task_timeout = true, on_worker_lost = true, executable = true,
  limits = true, output = true, max_output = true,
  hosts = true, launcher = true, host_timeout = true, start_timeout = true, remote = true,
  workers_per_host = true, reconnect = true,
}

--- Create an executor.
-- @tparam[opt] table opts `max_workers`, `context` ("fork"), `initializer`,
--   `initargs`, `max_tasks_per_child`, `task_timeout`, `on_worker_lost`
--   ("replace" or "break"), `limits` ({ memory =, cpu =, nofile =, nice = }),
--   `output` ("inherit" or "capture"), `max_output` (bytes kept per stream
--   per task, default 1 MiB).
function M.ProcessPoolExecutor(opts)
  opts = check_opts(opts, EXEC_OPTS, "ProcessPoolExecutor")
  local on_hosts, host_opts = hosts.hosts_of(opts, "ProcessPoolExecutor", 2)
  local mw = opts.max_workers
  if mw == nil then mw = core.cpu_count() end
  if not is_int(mw) or mw < 1 then error("max_workers must be greater than 0", 2) end
  local ctx = on_hosts and {} or context_of(opts, 2)
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
  local limits = limits_of(opts.limits, "ProcessPoolExecutor", 2)
  local out, max_output = output.options_of(opts, 2)
  return core.executor_new(hosts.core_opts({
    max_workers = mw, initializer = init, initargs = opts.initargs,
    max_tasks_per_child = mt, task_timeout = tt, on_worker_lost = owl,
    context = ctx.context, executable = ctx.executable, limits = limits,
    output = out, max_output = max_output,
  }, on_hosts, host_opts))
end

--- Run `fn(...)` in a worker; returns a Future.
function Executor:submit(fn, ...)
  check_fn(fn, 1, "submit")
  return self:_submit(nil, fn, ...)
end

--- As submit, with per-task options: `timeout` (a deadline in seconds;
-- past it the worker is stopped and the future fails with
-- DeadlineExceeded), `output` ("inherit" or "capture"; default: the
-- executor's).
function Executor:submit_with(opts, fn, ...)
  opts = check_opts(opts, { timeout = true, output = true }, "submit_with")
  local t = opts.timeout
  if t ~= nil and (type(t) ~= "number" or not (t > 0)) then -- luacheck: ignore 581 (NaN too)
    error("bad timeout to 'submit_with' (number of seconds > 0 expected)", 2)
  end
  local capture = output.capture_of(opts.output, "submit_with", 2)
  check_fn(fn, 2, "submit_with")
  if capture ~= nil then return self:_submit_as(t, capture, fn, ...) end
  return self:_submit(t, fn, ...)
end

--- Lazy parallel map: `for i, v in ex:map(fn, items) do`. Yields `i, v`
-- in input order; raises the first task error when iteration reaches it.
-- @tparam[opt] table opts `timeout` (whole map), `chunksize`, `buffersize`,
--   `progress`, `output`, `on_output`.
function Executor:map(fn, iterable, opts)
  return map.iterate(self, fn, iterable, opts, false, "map", "stop")
end

--- As `map`, each item a table of arguments.
function Executor:starmap(fn, iterable, opts)
  return map.iterate(self, fn, iterable, opts, true, "starmap", "stop")
end

--- Wait until the executor's workers have exited (after _shutdown or
-- _kill), reap them, and run the done callbacks that are due.
function M.join(ex)
  await(ex, nil)
  ex:_join()
  core.drain()
end

local join = M.join

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

--- Leaving a `<close>` scope normally waits for every task (shutdown);
-- leaving it by an error (Ctrl-C's "interrupted!" included) stops the
-- work: pending tasks are cancelled, running ones fail as their workers
-- are killed, and the workers are reaped before the error goes on.
-- `abandon(ex)` is that stop (the Pool's `__close` shares it).
function M.abandon(ex)
  if ex:_state() == "dead" then return end
  ex:_shutdown(true)
  stop(ex, 9)
end

local abandon = M.abandon

core.Executor.__close = function(self, err)
  if err ~= nil then abandon(self) else self:shutdown() end
end

core.Executor.__tostring = function(self)
  return string.format("procpool.Executor: %s (%d workers)", (self:_state()), self:_nworkers())
end

return M
