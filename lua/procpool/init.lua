--- procpool: process pools with futures for Lua 5.4.
--
-- `ProcessPoolExecutor` (concurrent.futures style) and `Pool`
-- (multiprocessing style) over a C engine: tasks run in worker processes,
-- futures are userdata, every wait goes through one C primitive that can
-- yield inside coroutines (see `set_waiter`).
--
-- This file only assembles the public table; the parts are plain modules
-- (docs/architecture.md lists them): procpool.futures, procpool.executor
-- and procpool.pool, over procpool.map, procpool.progress,
-- procpool.check and the C core, procpool.core.
-- @module procpool
local core = require "procpool.core"
local futures = require "procpool.futures"
local executor = require "procpool.executor"
local pool = require "procpool.pool"

local M = {}

--- Version of procpool.
M.VERSION = "0.1.0"

M.FIRST_COMPLETED = futures.FIRST_COMPLETED
M.FIRST_EXCEPTION = futures.FIRST_EXCEPTION
M.ALL_COMPLETED = futures.ALL_COMPLETED

M.is_error = core.is_error
M.serialize = core.serialize
M.deserialize = core.deserialize
M.cpu_count = core.cpu_count
M.current_worker = core.current_worker
M.report = core.report
M.set_waiter = futures.set_waiter

M.wait = futures.wait
M.as_completed = futures.as_completed

M.ProcessPoolExecutor = executor.ProcessPoolExecutor
M.Executor = M.ProcessPoolExecutor

M.Pool = pool.Pool
M.AsyncResult = pool.AsyncResult

return M
