-- CPython's own tests of concurrent.futures (Lib/test/test_concurrent_futures/:
-- test_future, test_wait, test_as_completed, test_shutdown, executor.py's
-- ExecutorTest, test_process_pool, test_deadlock, test_init), translated to
-- procpool. Each `it` names the CPython test it comes from. Tests that an
-- earlier spec already translates are not repeated here (see spec/11, 12,
-- 13, 14, 16, 30). Where procpool deliberately differs from Python
-- (docs/api.md), the test checks procpool's documented behaviour and says so.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 10 -- seconds: the timeout on every blocking call here
local build = os.getenv("PROCPOOL_BUILD") or "build"
local prelude = "package.path = 'lua/?.lua;lua/?/init.lua;./?.lua;' .. package.path\n"
  .. "package.cpath = '" .. build .. "/?.so;' .. package.cpath\n"
local SPEC_FILE = "70%-cpython_futures_spec%.lua"

-- Executors made through new() are shut down after each test.
local made = {}
local function new(opts)
  local ex = procpool.ProcessPoolExecutor(opts)
  made[#made + 1] = ex
  return ex
end

-- Gates stand in for CPython's events: a task blocks in wait_gate(path)
-- until the test opens the gate (creates the file). after_each opens every
-- gate, so no task stays blocked. A false path does not block.
local gates = {}
local function new_gate()
  local path = os.tmpname()
  os.remove(path)
  gates[#gates + 1] = path
  return path
end

local function open_gate(path)
  local f = assert(io.open(path, "w"))
  f:close()
end

local function wait_gate(path, v)
  if not path then return v end
  local sleep = require("procpool.core").sleep
  for _ = 1, 1000 do -- at most about 10 s
    local f = io.open(path)
    if f then
      f:close()
      return v
    end
    sleep(0.01)
  end
  error("gate never opened: " .. path, 0)
end

-- A task that kills its own worker with a signal (Lua has no kill).
local function crash(delay)
  local sleep = require("procpool.core").sleep
  if delay then sleep(delay) end
  os.execute("kill -SEGV $PPID")
  sleep(5)
end

local function raised(fn, ...)
  local ok, e = pcall(fn, ...)
  assert(not ok, "expected an error")
  return e
end

-- A pending future (queued behind a blocked task on a fresh one-worker
-- executor), the blocked running task and its gate.
local function pending_future()
  local ex = new { max_workers = 1 }
  local g = new_gate()
  local blocker = ex:submit(wait_gate, g, "blocker")
  local f = ex:submit("spec.tasks.add", 40, 2)
  assert(H.eventually(function() return blocker:running() end, T), "blocker never ran")
  assert(not f:running() and not f:done(), "the second task was handed out early")
  return f, blocker, g, ex
end

local function cancelled_future()
  local f = pending_future()
  assert(f:cancel(), "could not cancel a pending future")
  return f
end

local function ppid_of(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("%) %a (%d+)"))
end

describe("CPython concurrent.futures tests", function()
  after_each(function()
    for _, g in ipairs(gates) do pcall(open_gate, g) end
    for _, ex in ipairs(made) do pcall(ex.shutdown, ex, { cancel_futures = true }) end
    for _, g in ipairs(gates) do os.remove(g) end
    made, gates = {}, {}
    collectgarbage()
    collectgarbage()
  end)

  describe("test_future", function()
    it("a done callback added before the task fails sees its error (test_future: test_done_callback_with_exception)", function()
      local ex = new { max_workers = 1 }
      local g = new_gate()
      local f = ex:submit(function(path, wait)
        wait(path)
        error({ args = { "test" } })
      end, g, wait_gate)
      local seen, calls = nil, 0
      f:add_done_callback(function(fut)
        calls = calls + 1
        seen = fut:exception(0)
      end)
      assert.are.equal(0, calls)
      open_gate(g)
      assert.are.same({ args = { "test" } }, f:exception(T))
      assert.are.equal(1, calls)
      assert.are.same({ args = { "test" } }, seen)
    end)

    it("a done callback added to a succeeded future runs at once (test_future: test_done_callback_already_successful)", function()
      local ex = new { max_workers = 1 }
      local f = ex:submit("spec.tasks.add", 2, 3)
      assert.are.equal(5, f:result(T))
      local got
      f:add_done_callback(function(fut) got = fut:result(0) end)
      assert.are.equal(5, got)
    end)

    it("a raising callback added to a done future is reported on stderr, not raised (test_future: test_done_callback_raises_already_succeeded)", function()
      local ok, out, err = H.run_lua(prelude .. [[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
        local f = ex:submit("spec.tasks.add", 2, 3)
        f:result(10)
        local added = pcall(f.add_done_callback, f, function() error("doh!") end)
        io.write(tostring(added), " ", f:result(0))
        ex:shutdown()
      ]], 20)
      assert.is_true(ok, err)
      assert.are.equal("true 5", out)
      assert.matches("exception calling callback for", err)
      assert.matches("doh!", err)
    end)

    it("tostring gives the state: pending, running, finished (test_future: test_repr)", function()
      -- procpool's form is "procpool.Future: 0x... (state)"; a failed future is
      -- "finished" too (Python adds "raised E" / "returned T").
      local f, blocker, g, ex = pending_future()
      assert.matches("^procpool%.Future: 0x%x+ %(pending%)$", tostring(f))
      assert.matches("^procpool%.Future: 0x%x+ %(running%)$", tostring(blocker))
      local bad = ex:submit("spec.tasks.fail", "E")
      open_gate(g)
      bad:exception(T)
      assert.matches("^procpool%.Future: 0x%x+ %(finished%)$", tostring(bad))
      f:result(T)
      assert.matches("^procpool%.Future: 0x%x+ %(finished%)$", tostring(f))
    end)

    it("error objects are named procpool.<Name> (test_future: test_class_str)", function()
      -- Python checks the names of its classes; procpool's errors are tables
      -- whose tostring starts with "procpool.<Name>: ".
      local f, _, g = pending_future()
      local errs = {}
      errs.TimeoutError = raised(f.result, f, 0)
      assert.is_true(f:cancel())
      errs.CancelledError = raised(f.result, f, 0)
      open_gate(g)
      local ex = new { max_workers = 1 }
      ex:shutdown()
      errs.InvalidStateError = raised(ex.submit, ex, "spec.tasks.add", 1, 1)
      local ex2 = new { max_workers = 1 }
      local r = ex2:submit("spec.tasks.sleep", 5)
      assert.is_true(H.eventually(function() return r:running() end, T))
      ex2:terminate_workers()
      errs.BrokenProcessPool = r:exception(T)
      for name, e in pairs(errs) do
        assert.is_true(procpool.is_error(e, name), name .. ": " .. tostring(e))
        assert.are.equal(name, e.name)
        assert.matches("^procpool%." .. name .. ": .+", tostring(e))
      end
    end)

    it("result(timeout) on a pending future wakes when it completes (test_future: test_result_with_success)", function()
      local ex = new { max_workers = 1 }
      ex:submit("spec.tasks.sleep", 0.3)
      local f = ex:submit("spec.tasks.add", 40, 2)
      assert.is_false(f:done())
      local t0 = core.monotonic()
      assert.are.equal(42, f:result(5))
      local waited = core.monotonic() - t0
      assert.is_true(waited > 0.2 and waited < 2, "waited " .. waited)
    end)

    it("exception(timeout) on a pending future wakes when it fails (test_future: test_exception_with_success)", function()
      local ex = new { max_workers = 1 }
      ex:submit("spec.tasks.sleep", 0.3)
      local f = ex:submit("spec.tasks.fail", { kind = "OSError" })
      assert.is_false(f:done())
      local t0 = core.monotonic()
      assert.are.same({ kind = "OSError" }, f:exception(5))
      assert.is_true(core.monotonic() - t0 > 0.2)
    end)
  end)

  describe("test_wait", function()
    it("FIRST_EXCEPTION with some futures already done (test_wait: test_first_exception_some_already_complete)", function()
      -- procpool counts a cancelled future as done (Python leaves a merely
      -- cancelled one in not_done): it is in `done`, but it is not a failure.
      local ex = new { max_workers = 2 }
      local g = new_gate()
      local ok = ex:submit("spec.tasks.add", 40, 2)
      ok:result(T)
      local cancelled = cancelled_future()
      local failing = ex:submit(function(a, b) return a // b end, 21, 0)
      local blocked = ex:submit(wait_gate, g)
      local t0 = core.monotonic()
      local done, not_done = procpool.wait({ ok, cancelled, failing, blocked },
        { timeout = T, return_when = procpool.FIRST_EXCEPTION })
      assert.is_true(core.monotonic() - t0 < 2)
      assert.are.same({ ok, cancelled, failing }, done)
      assert.are.same({ blocked }, not_done)
      open_gate(g)
      blocked:result(T)
    end)

    it("FIRST_COMPLETED returns while a later task of the same worker still runs (test_wait: test_first_completed)", function()
      -- fixed by issue 13 item 1
      local ex = new { max_workers = 1 }
      -- a burst of tiny tasks first, so that the worker is handed tasks ahead
      for i = 1, 200 do ex:submit("spec.tasks.add", i, 0) end
      local g = new_gate()
      local fast = ex:submit("spec.tasks.add", 21, 21)
      local blocked = ex:submit(wait_gate, g)
      local t0 = core.monotonic()
      local done, not_done = procpool.wait({ fast, blocked },
        { timeout = 2, return_when = procpool.FIRST_COMPLETED })
      local waited = core.monotonic() - t0
      open_gate(g)
      assert.are.same({ fast }, done)
      assert.are.same({ blocked }, not_done)
      assert.is_true(waited < 1, "waited " .. waited)
      blocked:result(T)
    end)

    it("ALL_COMPLETED over futures of 33 executors (test_wait: test_all_completed)", function()
      -- fixed by issue 13 item 8
      local fs = {}
      for i = 1, 33 do
        fs[i] = new({ max_workers = 1 }):submit("spec.tasks.sleep", 0.05, i)
      end
      local t0 = core.monotonic()
      local done, not_done = procpool.wait(fs, { timeout = 3 })
      local waited = core.monotonic() - t0
      assert.are.equal(33, #done)
      assert.are.equal(0, #not_done)
      assert.is_true(waited < 2, "waited " .. waited)
      local n = 0
      for f in procpool.as_completed(fs, T) do
        n = n + 1
        assert.is_true(f:done())
      end
      assert.are.equal(33, n)
    end)
  end)

  describe("test_as_completed", function()
    it("yields cancelled, failed and succeeded futures alike (test_as_completed: test_no_timeout)", function()
      local ex = new { max_workers = 2 }
      local cancelled = cancelled_future()
      local err = ex:submit("spec.tasks.fail", "E")
      local ok = ex:submit("spec.tasks.add", 40, 2)
      procpool.wait({ err, ok }, { timeout = T })
      local f1 = ex:submit("spec.tasks.add", 2, 21)
      local f2 = ex:submit("spec.tasks.add", 7, 6)
      local seen, n = {}, 0
      for f in procpool.as_completed({ cancelled, err, ok, f1, f2 }, T) do
        assert.is_nil(seen[f])
        seen[f] = true
        n = n + 1
      end
      assert.are.equal(5, n)
      for _, f in ipairs({ cancelled, err, ok, f1, f2 }) do assert.is_true(seen[f]) end
    end)
  end)

  describe("ExecutorTest (executor.py)", function()
    it("sends cjson.null and gets it back (executor: test_submit)", function()
      -- fixed by issue 13 item 9
      local cjson = require "cjson"
      local ex = new { max_workers = 1 }
      local f = ex:submit("spec.tasks.echo", cjson.null, 256)
      local v, n = f:result(T)
      assert.are.equal(cjson.null, v)
      assert.are.equal(256, n)
    end)

    it("starmap over pairs equals the sequential results, chunksize 1 and 3 (executor: test_map)", function()
      local function pow(x, y)
        local r = 1
        for _ = 1, y do r = r * x end
        return r
      end
      local pairs_, want = {}, {}
      for i = 0, 9 do
        pairs_[#pairs_ + 1] = { i, i }
        want[#want + 1] = pow(i, i)
      end
      local ex = new { max_workers = 2 }
      for _, cs in ipairs({ 1, 3 }) do
        local got = {}
        for i, v in ex:starmap(pow, pairs_, { chunksize = cs, timeout = T }) do got[i] = v end
        assert.are.same(want, got)
      end
    end)

    it("raises a task's error at its position, then ends (executor: test_map_exception)", function()
      -- procpool's ex:map ends at the first error (documented; Python 3.13
      -- does so too, CPython main goes on with the next results).
      local ex = new { max_workers = 2 }
      local idiv = function(a, b) return a // b end
      local it = ex:starmap(idiv, { { 5, 2 }, { 5, 3 }, { 5, 0 }, { 5, 5 } },
        { chunksize = 1, timeout = T })
      assert.are.same({ 1, 2 }, { it() })
      assert.are.same({ 2, 1 }, { it() })
      assert.matches("attempt to divide by zero", raised(it))
      assert.is_nil(it())
      assert.is_nil(it())
      -- with chunks: the results before the error in the same chunk come first
      it = ex:starmap(idiv, { { 5, 2 }, { 5, 0 }, { 5, 3 }, { 5, 5 } },
        { chunksize = 3, timeout = T })
      assert.are.same({ 1, 2 }, { it() })
      assert.matches("attempt to divide by zero", raised(it))
      assert.is_nil(it())
      assert.is_nil(it())
    end)

    it("a TimeoutError raised by the task is a task error, not the map's timeout (executor: test_map_timeout_from_callable)", function()
      -- the iteration then ends, as for any task error in procpool's ex:map
      local ex = new { max_workers = 2 }
      local function timeout_on_one(x)
        if x == 1 then
          error(require("procpool.core").error("TimeoutError", "raised by the task"), 0)
        end
        return x
      end
      for _, timeout in ipairs({ false, T }) do
        local it = ex:map(timeout_on_one, { 0, 1, 2, 3 },
          { chunksize = 1, timeout = timeout or nil })
        assert.are.same({ 1, 0 }, { it() })
        local e = raised(it)
        assert.is_true(procpool.is_error(e, "TimeoutError"), tostring(e))
        assert.are.equal("raised by the task", e.message)
        assert.is_nil(it())
      end
    end)

    it("the iterator is exhausted after the map's timeout (executor: test_map_timeout)", function()
      local ex = new { max_workers = 2 }
      local g = new_gate()
      local it = ex:map(wait_gate, { false, false, g }, { timeout = 0.5, chunksize = 1 })
      local got = 0
      local ok, e = pcall(function()
        while it() do got = got + 1 end
      end)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "TimeoutError"), tostring(e))
      assert.is_true(got <= 2)
      assert.is_nil(it())
      assert.is_nil(it())
    end)

    it("results finished in a chunk are yielded before a later item of the chunk times out (executor: test_map_timeout)", function()
      -- fixed by issue 13 item 1
      local ex = new { max_workers = 2 }
      local g = new_gate()
      local got = {}
      local ok, e = pcall(function()
        for i in ex:map(wait_gate, { false, false, g }, { timeout = 0.5, chunksize = 3 }) do
          got[#got + 1] = i
        end
      end)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "TimeoutError"), tostring(e))
      assert.are.same({ 1, 2 }, got)
    end)

    it("leaving the loop ends the iterator (executor: test_map_close)", function()
      local ex = new { max_workers = 2 }
      local idiv = function(a, b) return a // b end
      for _, cs in ipairs({ 1, 3 }) do
        local it, s, c, closer = ex:starmap(idiv, { { 5, 2 }, { 5, 0 }, { 5, 3 }, { 5, 5 } },
          { chunksize = cs, timeout = T })
        local first
        for _, v in it, s, c, closer do -- luacheck: ignore 512 (the first item, then close)
          first = v
          break
        end
        assert.are.equal(2, first)
        assert.is_nil(it())
        assert.is_nil(it())
      end
    end)

    it("refuses a buffersize that is not an integer (executor: test_map_buffersize_type_validation)", function()
      local ex = new { max_workers = 1 }
      for _, bs in ipairs({ "foo", 2.0 }) do
        local ok, e = pcall(ex.map, ex, tostring, { 0, 1, 2, 3 }, { buffersize = bs })
        assert.is_false(ok)
        assert.matches("buffersize must be an integer", e)
      end
    end)

    it("refuses a buffersize below 1 (executor: test_map_buffersize_value_validation)", function()
      local ex = new { max_workers = 1 }
      for _, bs in ipairs({ 0, -1 }) do
        local ok, e = pcall(ex.map, ex, tostring, { 0, 1, 2, 3 }, { buffersize = bs })
        assert.is_false(ok)
        assert.matches("buffersize must be an integer >= 1", e)
      end
    end)

    it("gives every result whatever the buffersize (executor: test_map_buffersize)", function()
      local ex = new { max_workers = 2 }
      for _, bs in ipairs({ 1, 2, 4, 8 }) do
        local got = {}
        for i, v in ex:map("tostring", { 0, 1, 2, 3 }, { buffersize = bs, timeout = T }) do
          got[i] = v
        end
        assert.are.same({ "0", "1", "2", "3" }, got)
      end
    end)

    it("starmap gives every result whatever the buffersize (executor: test_map_buffersize_on_multiple_iterables)", function()
      local ex = new { max_workers = 2 }
      local items = { { 0, 0 }, { 1, 1 }, { 2, 2 }, { 3, 3 } }
      for _, bs in ipairs({ 1, 2, 4, 8 }) do
        local got = {}
        for i, v in ex:starmap("spec.tasks.add", items, { buffersize = bs, timeout = T }) do
          got[i] = v
        end
        assert.are.same({ 0, 2, 4, 6 }, got)
      end
    end)

    it("starmap over an endless input with a buffersize (executor: test_map_buffersize_on_multiple_infinite_iterables)", function()
      local ex = new { max_workers = 2 }
      local n = -1
      local function counts()
        n = n + 1
        return { n, n }
      end
      local got = {}
      local opts = { chunksize = 1, buffersize = 2, timeout = T }
      for i, v in ex:starmap("spec.tasks.add", counts, opts) do
        got[i] = v
        if i == 3 then break end
      end
      assert.are.same({ 0, 2, 4 }, got)
      assert.is_true(n <= 2 + 2 + 1, "read " .. (n + 1) .. " items")
    end)

    it("an empty input with a buffersize yields nothing (executor: test_map_buffersize_on_empty_iterable)", function()
      local ex = new { max_workers = 1 }
      assert.is_nil(ex:map("tostring", {}, { buffersize = 2, timeout = T })())
      local nothing = function() return nil end
      assert.is_nil(ex:map("tostring", nothing, { buffersize = 2, timeout = T })())
    end)

    it("keeps no reference to a submitted function's upvalues or arguments (executor: test_no_stale_references)", function()
      local ex = new { max_workers = 1 }
      local weak = setmetatable({}, { __mode = "k" })
      do
        local obj = { name = "my_object" }
        weak[obj] = "upvalue"
        ex:submit(function() return obj.name end) -- the future is dropped
        local arg = { 1, 2, 3 }
        weak[arg] = "argument"
        ex:submit("spec.tasks.echo", arg)
      end
      assert.are.equal(2, ex:submit("spec.tasks.add", 1, 1):result(T))
      collectgarbage()
      collectgarbage()
      local _, what = next(weak)
      assert.is_nil(what, "still referenced: the " .. tostring(what))
    end)

    it("the map iterator keeps no reference to values it yielded (executor: test_free_reference)", function()
      local ex = new { max_workers = 2 }
      local items = H.range(10)
      for _, cs in ipairs({ 1, 3 }) do
        local weak = setmetatable({}, { __mode = "v" })
        local kept = 0
        local boxed = function(x) return { x } end
        for _, obj in ex:map(boxed, items, { chunksize = cs, timeout = T }) do
          weak[1] = obj
          obj = nil -- luacheck: ignore
          collectgarbage()
          collectgarbage()
          if weak[1] ~= nil then kept = kept + 1 end
        end
        assert.are.equal(0, kept,
          "chunksize " .. cs .. ": " .. kept .. " yielded values still referenced")
      end
    end)
  end)

  describe("test_shutdown", function()
    it("a script that ends with a task running loses it, quietly and at once (test_shutdown: test_interpreter_shutdown)", function()
      -- procpool differs from Python on purpose (docs: "Garbage collection and
      -- exit"): when the Lua state closes, workers are killed and unfinished
      -- tasks are lost; with an explicit shutdown the task finishes.
      local script = [[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
        ex:submit(function()
          require("procpool.core").sleep(0.3)
          io.write("apple\n")
          io.flush()
        end)
      ]]
      local t0 = core.monotonic()
      local ok, out, err = H.run_lua(prelude .. script, 20)
      assert.is_true(ok, err)
      assert.are.equal("", err)
      assert.are.equal("", out)
      assert.is_true(core.monotonic() - t0 < 5)
      ok, out, err = H.run_lua(prelude .. script .. "\nex:shutdown()\n", 20)
      assert.is_true(ok, err)
      assert.are.equal("", err)
      assert.are.equal("apple", out:match("^%s*(.-)%s*$"))
    end)

    it("submit from a finalizer run after the executor's is refused with InvalidStateError (test_shutdown: test_submit_after_interpreter_shutdown)", function()
      -- fixed by issue 13 item 7
      local ok, out, err = H.run_lua(prelude .. [[
        local procpool = require "procpool"
        local ex
        -- finalizers run in reverse order of marking: this one after ex's
        local last = setmetatable({}, { __gc = function()
          local ok, e = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
          io.write(tostring(ok), " ", tostring(procpool.is_error(e, "InvalidStateError")), " ",
            tostring(type(e) == "table" and e.message or e), "\n")
        end })
        ex = procpool.ProcessPoolExecutor { max_workers = 1 }
        io.write(ex:submit("spec.tasks.add", 40, 2):result(10), "\n")
      ]], 20)
      assert.is_true(ok, err)
      assert.are.equal("42\nfalse true the executor is closed\n", out)
    end)

    it("shutdown(wait = false) then the end of the script does not hang (test_shutdown: test_hang_gh83386)", function()
      local t0 = core.monotonic()
      local ok, out, err = H.run_lua(prelude .. [[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
        ex:submit(function()
          require("procpool.core").sleep(0.3)
          io.write("apple\n")
          io.flush()
        end)
        ex:shutdown { wait = false }
      ]], 20)
      assert.is_true(ok, err)
      assert.are.equal("", err)
      assert.is_true(out == "" or out == "apple\n", out)
      assert.is_true(core.monotonic() - t0 < 5)
    end)

    it("shutdown(wait = false, cancel_futures = true) then the end of the script (test_shutdown: test_cancel_futures_wait_false)", function()
      local t0 = core.monotonic()
      local ok, out, err = H.run_lua(prelude .. [[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
        ex:submit(function()
          require("procpool.core").sleep(0.1)
          io.write("apple\n")
          io.flush()
        end)
        ex:shutdown { wait = false, cancel_futures = true }
      ]], 20)
      assert.is_true(ok, err)
      assert.are.equal("", err)
      assert.is_true(out == "" or out == "apple\n", out)
      assert.is_true(core.monotonic() - t0 < 5)
    end)

    it("submit after a <close> scope raises InvalidStateError (test_shutdown: test_run_after_shutdown)", function()
      local ex_ref
      do
        local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1 }
        ex_ref = ex
        assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
      end
      local e = raised(ex_ref.submit, ex_ref, "spec.tasks.add", 2, 5)
      assert.is_true(procpool.is_error(e, "InvalidStateError"), tostring(e))
      assert.are.equal("cannot schedule new futures after shutdown", e.message)
    end)

    it("a <close> executor left by an error cancels queued work and stops within 1 s (test_shutdown: test_context_manager_shutdown)", function()
      -- fixed by issue 13 item 2
      local fs, t0 = {}, nil
      local ok, e = pcall(function()
        local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1 }
        fs[1] = ex:submit("spec.tasks.sleep", 0.5, 1)
        for i = 2, 4 do fs[i] = ex:submit("spec.tasks.sleep", 0.3, i) end
        assert(H.eventually(function() return fs[1]:running() end, T))
        t0 = core.monotonic()
        error("body failed", 0)
      end)
      local took = core.monotonic() - t0
      assert.is_false(ok)
      assert.are.equal("body failed", e)
      assert.is_true(took < 1, "the scope exit took " .. took .. " s")
      for i = 1, 4 do assert.is_true(fs[i]:done()) end
      assert.is_true(fs[4]:cancelled())
      assert.is_true(H.eventually(function() return #H.children() == 0 end, 1))
    end)

    it("a map iterator keeps its dropped executor alive (test_shutdown: test_del_shutdown)", function()
      local it, s, c, closer
      do
        local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
        local items = {}
        for i = -5, 4 do items[#items + 1] = i end
        it, s, c, closer = ex:map("math.abs", items, { timeout = T })
      end
      collectgarbage()
      collectgarbage()
      local got = {}
      for i, v in it, s, c, closer do got[i] = v end
      assert.are.same({ 5, 4, 3, 2, 1, 0, 1, 2, 3, 4 }, got)
      it, closer = nil, nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      assert.is_true(H.eventually(function() return #H.children() == 0 end, T))
    end)

    it("map results still arrive after shutdown(wait = false), and the workers exit (test_shutdown: test_shutdown_no_wait)", function()
      local ex = new { max_workers = 2 }
      local items = {}
      for i = -5, 4 do items[#items + 1] = i end
      local it = ex:map(function(x)
        require("procpool.core").sleep(0.02)
        return math.abs(x)
      end, items, { buffersize = 10, timeout = T })
      local got = {}
      local i, v = it() -- the first step schedules all ten
      got[i] = v
      local t0 = core.monotonic()
      ex:shutdown { wait = false }
      assert.is_true(core.monotonic() - t0 < 0.1)
      for j, w in it do got[j] = w end
      assert.are.same({ 5, 4, 3, 2, 1, 0, 1, 2, 3, 4 }, got)
      assert.is_true(H.eventually(function() return #H.children() == 0 end, T),
        "workers left after shutdown(wait = false)")
    end)

    for _, case in ipairs({ { 1, 2 }, { 2, 4 } }) do
      it(string.format("max_tasks_per_child = 1, a failing task, shutdown(wait = false): no error, no hang, %d workers (test_shutdown: test_shutdown_gh_132969_case_%d)",
        case[2], case[1]), function()
        local ex = new { max_workers = case[2], max_tasks_per_child = 1 }
        local good = function(n)
          require("procpool.core").sleep(0.05 * n)
          return n
        end
        local f1 = ex:submit(good, 1)
        local f2 = ex:submit(function() error("failing task", 0) end)
        local f3 = ex:submit(good, 3)
        local result = 0
        local ok, e = pcall(function()
          result = result + f1:result(T)
          result = result + f2:result(T)
          result = result + f3:result(T)
        end)
        assert.is_false(ok)
        assert.are.equal("failing task", e)
        assert.are.equal(1, result)
        ex:shutdown { wait = false }
        assert.are.equal(3, f3:result(T)) -- accepted work still runs
        assert.is_true(H.eventually(function() return #H.children() == 0 end, T))
      end)
    end
  end)

  describe("test_process_pool", function()
    it("the worker's traceback names the line that raised; the error keeps its contents (test_process_pool: test_traceback)", function()
      -- Lua tracebacks give file:line, not the source text Python shows
      local ex = new { max_workers = 1 }
      local line = debug.getinfo(1, "l").currentline + 1
      local f = ex:submit(function() error({ 123, kind = "RuntimeError" }) end)
      local e = raised(f.result, f, T)
      assert.are.same({ 123, kind = "RuntimeError" }, e)
      local tb = f:traceback()
      assert.is_string(tb)
      assert.matches(SPEC_FILE .. ":" .. line .. ":", tb)
    end)

    it("with on_worker_lost = \"break\", an exit in a task breaks the pool naming the exit code (test_process_pool: test_traceback_when_child_process_terminates_abruptly)", function()
      -- procpool's default ("replace") fails only that task with WorkerLost
      -- (spec/30); "break" is Python's behaviour.
      local ex = new { max_workers = 1, on_worker_lost = "break" }
      local e = ex:submit(function() os.exit(99) end):exception(T)
      assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e))
      assert.matches("terminated abruptly", e.message)
      assert.matches("exit code 99", e.message)
    end)

    it("a task's arguments are collected in the worker after the task (test_process_pool: test_ressources_gced_in_workers)", function()
      local ex = new { max_workers = 1 }
      local obj = setmetatable({}, { __gc = function()
        if require("procpool").current_worker() then rawset(_G, "spec_arg_collected", true) end
      end })
      assert.are.equal(1, ex:submit(function() return 1 end, obj):result(T))
      local collected = ex:submit(function()
        collectgarbage()
        collectgarbage()
        return rawget(_G, "spec_arg_collected")
      end):result(T)
      assert.is_true(collected)
    end)

    it("15 x max_workers tasks use exactly max_workers processes (test_process_pool: test_saturation)", function()
      local ex = new { max_workers = 2 }
      local fs = {}
      for i = 1, 30 do
        fs[i] = ex:submit(function()
          require("procpool.core").sleep(0.01)
          return require("procpool").current_worker().pid
        end)
      end
      -- the workers start in the background, all of them, and no more
      assert.is_true(H.eventually(function() return ex:stats().workers == 2 end, T))
      local pids, n = {}, 0
      for i = 1, 30 do
        local pid = fs[i]:result(T)
        if not pids[pid] then
          pids[pid] = true
          n = n + 1
        end
      end
      assert.is_true(n >= 1 and n <= 2, n .. " processes")
      local zygote = ppid_of(next(pids))
      assert.are.equal(2, #H.children(zygote))
      assert.are.equal(2, ex:stats().workers)
    end)

    for _, drop in ipairs({ false, true }) do
      it("after shutdown(wait = false) a worker at its task limit is replaced until the work is done"
        .. (drop and ", the executor collected" or "") .. " (test_process_pool: test_shutdown_no_wait_max_tasks_gh119592)", function()
        -- fixed by issue 13 item 4 (the collected case)
        local ex = procpool.ProcessPoolExecutor { max_workers = 1, max_tasks_per_child = 1 }
        if not drop then made[#made + 1] = ex end
        local fs = {}
        for i = 1, 3 do fs[i] = ex:submit("spec.tasks.sleep", 0.2, i - 1) end
        assert.is_true(H.eventually(function() return fs[1]:running() end, T))
        ex:shutdown { wait = false }
        if drop then
          local weak = setmetatable({ ex }, { __mode = "v" })
          ex = nil -- luacheck: ignore
          collectgarbage()
          collectgarbage()
          assert.is_nil(weak[1])
        end
        local got = {}
        for i = 1, 3 do
          local ok, v = pcall(fs[i].result, fs[i], T)
          got[i] = ok and v or tostring(v)
        end
        assert.are.same({ 0, 1, 2 }, got)
      end)
    end

    it("an executor collected while its worker exits at its task limit resolves every future (test_process_pool: test_gc_during_max_tasks_worker_exit_gh152967)", function()
      -- Python fails the rest with BrokenProcessPool ("garbage collected");
      -- procpool shuts a collected executor down with cancel_futures (docs:
      -- "Garbage collection and exit"): the running task finishes, the
      -- queued ones are cancelled.
      local fs = {}
      do
        local ex = procpool.ProcessPoolExecutor { max_workers = 1, max_tasks_per_child = 1 }
        for i = 1, 3 do fs[i] = ex:submit("spec.tasks.sleep", 0.2, i - 1) end
        assert.is_true(H.eventually(function() return fs[1]:running() end, T))
      end
      collectgarbage()
      collectgarbage()
      assert.are.equal(0, fs[1]:result(T))
      for i = 2, 3 do
        local e = raised(fs[i].result, fs[i], T)
        assert.is_true(procpool.is_error(e, "CancelledError"), tostring(e))
      end
      assert.is_true(H.eventually(function() return #H.children() == 0 end, T))
    end)

    for _, how in ipairs({ "terminate_workers", "kill_workers" }) do
      it(how .. " while a worker is at its task limit: queued futures fail, nothing is replaced (test_process_pool: test_force_shutdown_during_max_tasks_worker_exit)", function()
        local ex = new { max_workers = 1, max_tasks_per_child = 1 }
        local fs = {}
        for i = 1, 3 do fs[i] = ex:submit("spec.tasks.sleep", 0.1, i) end
        assert.is_true(H.eventually(function() return fs[1]:running() end, T))
        ex[how](ex)
        for i = 1, 3 do assert.is_true(fs[i]:done()) end
        for i = 2, 3 do
          local e = fs[i]:exception(0)
          assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e))
        end
        assert.are.equal(0, ex:stats().workers)
        assert.is_true(H.eventually(function() return #H.children() == 0 end, 2))
      end)
    end

    it("an executor whose workers cannot be started fails with a procpool error naming the cause (test_process_pool: test_failed_worker_replacement_breaks_pool)", function()
      -- fixed by issue 13 item 7
      local bad = "/nonexistent/lua5.4"
      local ok, e = pcall(function()
        local ex = new { max_workers = 1, context = "spawn", executable = bad }
        return ex:submit("spec.tasks.add", 1, 2):exception(T)
      end)
      -- either the constructor raised, or the future failed (BrokenProcessPool)
      assert.is_true(procpool.is_error(e), "not a procpool error: " .. tostring(e))
      if ok then assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e)) end
      assert.matches(bad, e.message, 1, true)
    end)

    for _, how in ipairs({ "terminate_workers", "kill_workers" }) do
      it(how .. " on a broken pool does not raise (test_process_pool: test_force_shutdown_workers_dead_workers)", function()
        local ex = new { max_workers = 1, on_worker_lost = "break" }
        local e = ex:submit(function() os.exit(1) end):exception(T)
        assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e))
        local ok, err = pcall(ex[how], ex)
        assert.is_true(ok, tostring(err))
        assert.is_true(H.eventually(function() return #H.children() == 0 end, T))
      end)

      it(how .. " right after creation is a quiet no-op that shuts down (test_process_pool: test_force_shutdown_workers_not_started_yet)", function()
        local ex = new { max_workers = 1 }
        local ok, err = pcall(ex[how], ex)
        assert.is_true(ok, tostring(err))
        local e = raised(ex.submit, ex, "spec.tasks.add", 1, 1)
        assert.is_true(procpool.is_error(e, "InvalidStateError"), tostring(e))
        assert.is_true(H.eventually(function() return #H.children() == 0 end, T))
      end)
    end
  end)

  describe("test_deadlock", function()
    -- the counterparts of Python's objects that fail while pickled or
    -- unpickled: __serialize hooks that fail in the sender, and constructors
    -- that fail in the receiver
    local function sending(hook)
      return setmetatable({}, { __serialize = hook })
    end
    local function received_by(ctor, ...)
      local args = table.pack(...)
      return setmetatable({}, {
        __serialize = function() return ctor, table.unpack(args, 1, args.n) end,
      })
    end

    it("an argument that fails to serialize raises at submit; the pool is unharmed (test_deadlock: test_error_at_task_pickle)", function()
      -- Python fails the future; procpool raises at submit (documented)
      local ex = new { max_workers = 2 }
      local bad = sending(function() error("Error in pickle", 0) end)
      local e = raised(ex.submit, ex, "spec.tasks.echo", bad)
      assert.is_true(procpool.is_error(e, "SerializationError"), tostring(e))
      assert.matches("__serialize failed: Error in pickle", e.message)
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
      assert.are.equal(0, ex:stats().worker_restarts)
    end)

    it("a map item that cannot be serialized raises once, at its position, and ends the map (test_deadlock: test_error_at_task_pickle)", function()
      -- fixed by issue 13 item 3
      local ex = new { max_workers = 2 }
      local co = coroutine.create(print)
      for _, cs in ipairs({ 1, 4 }) do
        local it = ex:map("spec.tasks.echo", { 1, 2, co, 4 }, { chunksize = cs, timeout = T })
        local got = {}
        local e
        for _ = 1, 5 do
          local ok, i, v = pcall(it)
          if not ok then
            assert.is_nil(e, "raised twice: " .. tostring(i))
            e = i
          elseif i then
            got[#got + 1] = v
          end
        end
        assert.are.same({ 1, 2 }, got)
        assert.is_true(procpool.is_error(e, "SerializationError"), tostring(e))
        assert.matches("cannot serialize a coroutine", e.message)
      end
    end)

    it("a worker that exits while decoding the arguments fails that task (test_deadlock: test_exit_at_task_unpickle)", function()
      -- Python breaks the pool; procpool fails that task with WorkerLost and
      -- replaces the worker (on_worker_lost = "replace", documented)
      local ex = new { max_workers = 2 }
      local e = ex:submit("spec.tasks.echo", received_by("os.exit", 3)):exception(T)
      assert.is_true(procpool.is_error(e, "WorkerLost"), tostring(e))
      assert.are.equal(3, e.exit_code)
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
    end)

    it("an error while the worker decodes the arguments fails that task (test_deadlock: test_error_at_task_unpickle)", function()
      -- Python breaks the pool; procpool fails the task with SerializationError
      local ex = new { max_workers = 2 }
      local e = ex:submit("spec.tasks.echo", received_by("error", "bad constructor")):exception(T)
      assert.is_true(procpool.is_error(e, "SerializationError"), tostring(e))
      assert.matches("constructor failed: bad constructor", e.message)
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
      assert.are.equal(0, ex:stats().worker_restarts)
    end)

    it("a worker that crashes while decoding the arguments fails that task (test_deadlock: test_crash_at_task_unpickle)", function()
      local ex = new { max_workers = 2 }
      local e = ex:submit("spec.tasks.echo", received_by("os.execute", "kill -SEGV $PPID")):exception(T)
      assert.is_true(procpool.is_error(e, "WorkerLost"), tostring(e))
      assert.are.equal(11, e.signal)
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
    end)

    it("a worker that crashes while encoding the result fails that task (test_deadlock: test_crash_during_result_pickle_on_worker)", function()
      local ex = new { max_workers = 2 }
      local e = ex:submit(function()
        return setmetatable({}, { __serialize = function()
          os.execute("kill -SEGV $PPID")
          require("procpool.core").sleep(5)
        end })
      end):exception(T)
      assert.is_true(procpool.is_error(e, "WorkerLost"), tostring(e))
      assert.are.equal(11, e.signal)
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
    end)

    it("a worker that exits while encoding the result fails that task (test_deadlock: test_exit_during_result_pickle_on_worker)", function()
      -- Python delivers SystemExit; os.exit ends a Lua worker: WorkerLost
      local ex = new { max_workers = 2 }
      local e = ex:submit(function()
        return setmetatable({}, { __serialize = function() os.exit(5) end })
      end):exception(T)
      assert.is_true(procpool.is_error(e, "WorkerLost"), tostring(e))
      assert.are.equal(5, e.exit_code)
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
    end)

    it("a result that fails to serialize fails that task; the worker stays (test_deadlock: test_error_during_result_pickle_on_worker)", function()
      local ex = new { max_workers = 1 }
      local pid = ex:submit("spec.tasks.pid"):result(T)
      local f = ex:submit(function()
        return setmetatable({}, { __serialize = function() error("Error in pickle", 0) end })
      end)
      local e = raised(f.result, f, T)
      assert.is_true(procpool.is_error(e, "SerializationError"), tostring(e))
      assert.matches("result%[1%]: __serialize failed: Error in pickle", e.message)
      assert.are.equal(pid, ex:submit("spec.tasks.pid"):result(T))
      assert.are.equal(0, ex:stats().worker_restarts)
    end)

    it("a result that fails to decode in the parent fails that future; the pool is unharmed (test_deadlock: test_error_during_result_unpickle_in_result_handler)", function()
      -- Python breaks the pool; procpool fails the future with SerializationError
      local ex = new { max_workers = 1 }
      local f = ex:submit(function()
        return setmetatable({}, { __serialize = function() return "error", "bad constructor" end })
      end)
      local e = raised(f.result, f, T)
      assert.is_true(procpool.is_error(e, "SerializationError"), tostring(e))
      assert.matches("constructor failed: bad constructor", e.message)
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
      -- exception() returns the failure; it raises only TimeoutError and CancelledError
      local ok, got = pcall(f.exception, f, T)
      assert.is_true(ok, "exception() raised " .. tostring(got))
      assert.is_true(procpool.is_error(got, "SerializationError"), tostring(got))
    end)

    for _, mode in ipairs({ "break", "replace" }) do
      it("a worker that crashes after shutdown(wait = true) began: no deadlock, on_worker_lost = \"" .. mode .. "\" (test_deadlock: test_shutdown_deadlock)", function()
        local ex = new { max_workers = 2, on_worker_lost = mode }
        local f = ex:submit(crash, 0.1)
        local t0 = core.monotonic()
        ex:shutdown()
        assert.is_true(core.monotonic() - t0 < 5)
        local e = raised(f.result, f, 0)
        local want = mode == "break" and "BrokenProcessPool" or "WorkerLost"
        assert.is_true(procpool.is_error(e, want), tostring(e))
        assert.are.equal(0, #H.children())
      end)
    end

    it("a serialization failure just before shutdown(wait = false): no deadlock (test_deadlock: test_shutdown_deadlock_pickle)", function()
      local ex = new { max_workers = 2 }
      assert.are.equal(42, ex:submit("spec.tasks.echo", 42):result(T))
      local bad = sending(function() error("Error in pickle", 0) end)
      local e = raised(ex.submit, ex, "spec.tasks.echo", bad)
      assert.is_true(procpool.is_error(e, "SerializationError"), tostring(e))
      local t0 = core.monotonic()
      ex:shutdown { wait = false }
      assert.is_true(core.monotonic() - t0 < 0.1)
      assert.is_true(H.eventually(function() return #H.children() == 0 end, T))
    end)

    it("a crash while pipe-sized arguments are in flight breaks the pool, no deadlock (test_deadlock: test_crash_big_data)", function()
      local ex = new { max_workers = 2, on_worker_lost = "break" }
      local data = ("a"):rep(4 * 1024 * 1024 + 1)
      local t0 = core.monotonic()
      local ok, e = pcall(function()
        for _ in ex:map(function(_) crash() end, { data, data, data, data }, { timeout = T }) do end
      end)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e))
      assert.is_true(core.monotonic() - t0 < 5)
    end)
  end)

  describe("test_init", function()
    it("a failing initializer breaks the pool and its error is logged on stderr (test_init: FailingInitializerMixin.test_initializer)", function()
      local ok, out, err = H.run_lua(prelude .. [[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor { max_workers = 2, initializer = function()
          require("procpool.core").sleep(0.1)
          error("error in initializer", 0)
        end }
        local ok, f = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
        local e = ok and f:exception(10) or f
        io.write(tostring(procpool.is_error(e, "BrokenProcessPool")), " ")
        local ok2, e2 = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
        io.write(tostring(procpool.is_error(e2, "BrokenProcessPool")))
        ex:shutdown()
      ]], 20)
      assert.is_true(ok, err)
      assert.are.equal("true true", out)
      assert.matches("exception in initializer: error in initializer", err)
    end)

    it("a failing initializer leaks no fds or processes (test_init: FailingInitializerResourcesTest)", function()
      local fds = H.settled_fd_count(T) -- earlier tests' processes and fds gone
      local ex = procpool.ProcessPoolExecutor { max_workers = 2, initializer = function()
        error("error in initializer", 0)
      end }
      local ok, f = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
      local e = ok and f:exception(T) or f
      assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e))
      ex:shutdown()
      ex, f = nil, nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      assert.are.equal(0, #H.children())
      assert.is_true(H.eventually(function() return H.fd_count() == fds end, 2),
        "fds: " .. fds .. " before, " .. H.fd_count() .. " after")
    end)
  end)
end)
