-- ProcessPoolExecutor: running tasks, values in and out, errors.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 10 -- seconds: the timeout on every blocking call here

describe("ProcessPoolExecutor", function()
  local ex
  before_each(function() ex = procpool.ProcessPoolExecutor { max_workers = 2 } end)
  after_each(function()
    ex:shutdown()
    collectgarbage()
    collectgarbage()
  end)

  it("runs a task and returns all its values", function()
    local a, b, c = ex:submit(function(x, y) return x + y, "two", nil end, 2, 3):result(T)
    assert.are.same({ 5, "two" }, { a, b })
    assert.is_nil(c)
    local n = select("#", ex:submit(function() return 1, nil, nil end):result(T))
    assert.are.equal(3, n)
  end)

  it("runs tasks in parallel in other processes", function()
    ex:submit("spec.tasks.add", 0, 0):result(T) -- workers up
    local t0 = core.monotonic()
    local fs = {}
    for i = 1, 4 do fs[i] = ex:submit("spec.tasks.sleep", 0.4, i) end
    for i = 1, 4 do assert.are.equal(i, fs[i]:result(T)) end
    local elapsed = core.monotonic() - t0
    assert.is_true(elapsed > 0.75 and elapsed < 1.2, "4 x 0.4 s on 2 workers took " .. elapsed)
    assert.are_not.equal(H.pid(), ex:submit("spec.tasks.pid"):result(T))
  end)

  it("uses every worker (least-loaded dispatch)", function()
    local fs = {}
    for i = 1, 6 do
      fs[i] = ex:submit(function()
        require("procpool.core").sleep(0.1)
        return require("procpool").current_worker().id
      end)
    end
    local ids = {}
    for i = 1, 6 do ids[fs[i]:result(T)] = true end
    assert.is_true(ids[1] and ids[2])
  end)

  it("gives spawned workers the parent's module paths and the user's own environment", function()
    -- with LUA_PATH_5_4 unset and LUA_CPATH_5_4 set, in a fresh process
    local cpath = (os.getenv("PROCPOOL_BUILD") or "build") .. "/?.so;;"
    local ok, out, err = H.run_lua([[
      package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
      local procpool = require "procpool"
      local ex = procpool.ProcessPoolExecutor { max_workers = 1, context = "spawn" }
      local r = ex:submit(function()
        return table.concat({ tostring(os.getenv("LUA_PATH_5_4")), tostring(os.getenv("LUA_CPATH_5_4")),
          tostring(os.getenv("PROCPOOL_SAVED_LUA_PATH_5_4")),
          tostring(os.getenv("PROCPOOL_SAVED_LUA_CPATH_5_4")), package.path }, "|")
      end):result(20)
      ex:shutdown()
      io.write(r, "\n", package.path)
    ]], 30, "env -u LUA_PATH_5_4 LUA_CPATH_5_4='" .. cpath .. "'")
    assert.is_true(ok, err)
    local got, parent_path = out:match("^(.-)\n(.*)$")
    assert.are.equal(table.concat({ "nil", cpath, "nil", "nil", parent_path }, "|"), got)
  end)

  it("gives tasks the parent's globals as they were at creation (fork)", function()
    if (os.getenv("PROCPOOL_CONTEXT") or "fork") ~= "fork" then
      return pending("fork context only: a spawned worker starts from a fresh interpreter")
    end
    rawset(_G, "spec_before", "seen")
    local ex2 = procpool.ProcessPoolExecutor { max_workers = 1 }
    rawset(_G, "spec_after", "not seen")
    local a = ex2:submit("spec.tasks.global", "spec_before"):result(T)
    local b = ex2:submit("spec.tasks.global", "spec_after"):result(T)
    ex2:shutdown()
    rawset(_G, "spec_before", nil)
    rawset(_G, "spec_after", nil)
    assert.are.equal("seen", a)
    assert.is_nil(b)
  end)

  it("copies upvalues by value at submit time", function()
    local counter = 10
    local f = function() counter = counter + 1 return counter end
    local f1 = ex:submit(f)
    counter = 100
    local f2 = ex:submit(f)
    assert.are.equal(11, f1:result(T))
    assert.are.equal(101, f2:result(T))
    assert.are.equal(100, counter)
  end)

  it("runs functions named \"module.name\" and \"module:name\"", function()
    assert.are.equal(7, ex:submit("spec.tasks.add", 3, 4):result(T))
    assert.are.equal(7, ex:submit("spec.tasks:add", 3, 4):result(T))
    assert.are.equal("x", ex:submit("string.lower", "X"):result(T))
    local ok, e = pcall(function() return ex:submit("spec.tasks.nope"):result(T) end)
    assert.is_false(ok)
    assert.matches("cannot find function 'spec.tasks.nope'", e)
  end)

  it("sends module upvalues and C functions by name", function()
    local cjson = require "cjson"
    local floor = math.floor
    local f = function(t) return cjson.encode(t), floor(2.5) end
    local s, n = ex:submit(f, { 1, 2 }):result(T)
    assert.are.equal("[1,2]", s)
    assert.are.equal(2, n)
  end)

  it("round-trips structured arguments and results", function()
    local shared = { "s" }
    local arg = { a = shared, b = shared, list = { 1, 2.5, "x", true }, [true] = 0 }
    local r = ex:submit(function(t) t.seen = true return t end, arg):result(T)
    assert.are.equal(r.a, r.b)
    assert.is_true(r.seen)
    assert.are.same(arg.list, r.list)
    assert.is_nil(arg.seen)
  end)

  it("leaves a collector the program stopped stopped, however much it submits", function()
    -- submit tells the collector of the memory a job holds (steps, which
    -- run even a stopped collector); a stopped one is not told
    local watch = setmetatable({}, { __mode = "k" })
    collectgarbage()
    collectgarbage("stop")
    local ok, err = pcall(function()
      watch[{}] = true -- garbage from now on: only a collection takes it
      local fs, arg = {}, ("x"):rep(4096) -- 20 MiB told: cycles over this heap
      for i = 1, 5000 do fs[i] = ex:submit(function(x) return #x end, arg) end
      for i = 1, 5000 do assert(fs[i]:result(T) == 4096) end
      assert(next(watch) ~= nil, "the stopped collector ran")
      assert(not collectgarbage("isrunning"))
    end)
    collectgarbage("restart")
    assert.is_true(ok, err)
    collectgarbage()
    assert.is_nil(next(watch)) -- and it does its work once restarted
  end)

  describe("the same function submitted again", function()
    -- (its encoding is reused when it cannot have changed: these fail if
    -- it were reused when it can)
    it("sends a closure's upvalues as they are at each submit", function()
      local k = 1
      local f = function() return k end
      assert.are.equal(1, ex:submit(f):result(T))
      k = 2
      assert.are.equal(2, ex:submit(f):result(T))
    end)

    it("gives a function the worker's globals as _ENV, whatever it holds here", function()
      local f = load("return function() return type(tag), type(print) end")()
      assert.are.same({ "nil", "function" }, { ex:submit(f):result(T) })
      debug.setupvalue(f, 1, { tag = "its own" })
      assert.are.same({ "nil", "function" }, { ex:submit(f):result(T) })
    end)

    it("runs it with the globals as _ENV again after a task replaced its _ENV", function()
      local one = procpool.ProcessPoolExecutor { max_workers = 1 }
      local f = load("return function(swap) if swap then _ENV = { type = type } end "
        .. "return type(print) end")()
      assert.are.equal("nil", one:submit(f, true):result(T))
      assert.are.equal("function", one:submit(f, false):result(T))
      one:shutdown()
    end)

    it("sends a function's bytes again once another was sent between", function()
      local f = function() return "f" end
      local g = function() return "g" end
      assert.are.equal("f", ex:submit(f):result(T))
      assert.are.equal("g", ex:submit(g):result(T))
      assert.are.equal("f", ex:submit(f):result(T))
      assert.are.equal("f", ex:submit(f):result(T))
    end)

    it("runs each of two functions submitted in turn", function()
      local f = function(x) return x + 1 end
      local g = function(x) return x * 10 end
      local fs = {}
      for i = 1, 20 do fs[i] = ex:submit(i % 2 == 1 and f or g, i) end
      for i = 1, 20 do assert.are.equal(i % 2 == 1 and i + 1 or i * 10, fs[i]:result(T)) end
    end)

    it("sends a large argument with it", function()
      local echo = function(x) return x end
      assert.are.equal(1, ex:submit(echo, 1):result(T))
      local big = ("x"):rep(3 * 1024 * 1024)
      assert.are.equal(big, ex:submit(echo, big):result(T))
      assert.are.equal(2, ex:submit(echo, 2):result(T))
    end)
  end)

  describe("task errors", function()
    it("re-raises a string error unchanged, with a worker traceback", function()
      local f = ex:submit(function() error("boom", 0) end)
      local ok, e = pcall(f.result, f, T)
      assert.is_false(ok)
      assert.are.equal("boom", e)
      assert.are.equal("boom", f:exception(T))
      local tb = f:traceback()
      assert.matches("stack traceback", tb)
      assert.matches("10%-executor_spec.lua", tb)
    end)

    it("re-raises a table error with its contents", function()
      local f = ex:submit(function() error({ code = 42, msg = "bad" }) end)
      local ok, e = pcall(f.result, f, T)
      assert.is_false(ok)
      assert.are.same({ code = 42, msg = "bad" }, e)
      assert.are.equal(e, select(2, pcall(f.result, f, T))) -- the same object each time
    end)

    it("keeps line numbers in error messages", function()
      local f = ex:submit(function() local x = nil; return x.field end)
      local _, e = pcall(f.result, f, T)
      assert.matches("10%-executor_spec.lua:%d+: attempt to index a nil value", e)
    end)

    it("counts error(nil) and error(false) as failures", function()
      for _, v in ipairs({ false, "nil" }) do
        local f = ex:submit(function(x) if x == "nil" then error(nil) end error(x) end, v)
        local ok, e = pcall(f.result, f, T)
        assert.is_false(ok)
        if v == "nil" then assert.is_nil(e) else assert.is_false(e) end
        assert.is_true(f:done())
      end
      assert.are.equal(2, ex:stats().failed)
    end)

    it("leaves the pool unharmed", function()
      for _ = 1, 5 do pcall(function() ex:submit("spec.tasks.fail", "x"):result(T) end) end
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
      -- no worker was lost to the errors (the second may still be starting)
      assert.are.equal(0, ex:stats().worker_restarts)
      assert.is_true(H.eventually(function() return ex:stats().workers == 2 end, T))
    end)
  end)

  describe("serialization failures", function()
    it("raises SerializationError at submit and queues nothing", function()
      local co = coroutine.create(print)
      local ok, e = pcall(ex.submit, ex, "spec.tasks.echo", 1, { handlers = { co } })
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "SerializationError"))
      assert.are.equal("args[2].handlers[1]: cannot serialize a coroutine", e.message)
      local ok2, e2 = pcall(ex.submit, ex, function() return co end)
      assert.is_false(ok2)
      assert.are.equal("fn.<upvalue co>: cannot serialize a coroutine", e2.message)
      local st = ex:stats()
      assert.are.equal(0, st.pending + st.running + st.completed)
    end)

    it("fails only the future whose result cannot be sent", function()
      local f = ex:submit(function() return coroutine.create(print) end)
      local ok, e = pcall(f.result, f, T)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "SerializationError"))
      assert.matches("result%[1%]: cannot serialize a coroutine", e.message)
      local pid1 = ex:submit("spec.tasks.pid"):result(T)
      assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T))
      assert.are.equal(0, ex:stats().worker_restarts)
      assert.is_number(pid1)
    end)

    it("reports an error value that cannot be sent", function()
      local f = ex:submit(function() error(coroutine.create(print)) end)
      local _, e = pcall(f.result, f, T)
      assert.is_true(procpool.is_error(e, "SerializationError"))
      assert.matches("cannot serialize a coroutine", e.reason)
    end)
  end)

  it("keeps workers busy while the parent is busy and never calls in", function()
    local fs = {}
    for i = 1, 4 do fs[i] = ex:submit("spec.tasks.sleep", 0.2, i) end
    -- the parent computes for 0.6 s without touching procpool
    local t0 = core.monotonic()
    local x = 0
    while core.monotonic() - t0 < 0.6 do x = x + 1 end
    local t1 = core.monotonic()
    for i = 1, 4 do assert.is_true(fs[i]:done(), "task " .. i .. " not done") end
    for i = 1, 4 do assert.are.equal(i, fs[i]:result(0)) end
    assert.is_true(core.monotonic() - t1 < 0.05)
  end)

  it("hands long tasks out a couple at a time, so late ones can be cancelled", function()
    local ex1 = procpool.ProcessPoolExecutor { max_workers = 1 }
    -- teach the window that tasks are long
    ex1:submit("spec.tasks.sleep", 0.15):result(T)
    local fs = {}
    for i = 1, 200 do fs[i] = ex1:submit("spec.tasks.sleep", 0.3, i) end
    core.sleep(0.05)
    assert.is_true(fs[1]:running())
    assert.is_false(fs[200]:running())
    assert.is_true(fs[200]:cancel())
    local st = ex1:stats()
    assert.is_true(st.running <= 3, "running: " .. st.running)
    ex1:shutdown { cancel_futures = true }
    assert.is_true(fs[200]:cancelled())
  end)

  it("batches tiny tasks deeply (all 2000 complete, in order)", function()
    local fs = {}
    for i = 1, 2000 do fs[i] = ex:submit("spec.tasks.square", i) end
    for i = 1, 2000 do assert.are.equal(i * i, fs[i]:result(T)) end
    assert.are.equal(2000, ex:stats().completed)
  end)

  it("mixes futures of several executors in one wait", function()
    local ex2 = procpool.ProcessPoolExecutor { max_workers = 1 }
    local a = ex:submit("spec.tasks.sleep", 0.1, "a")
    local b = ex2:submit("spec.tasks.sleep", 0.4, "b")
    local seen = {}
    for f in procpool.as_completed({ b, a }, T) do seen[#seen + 1] = f:result(0) end
    assert.are.same({ "a", "b" }, seen)
    local c = ex:submit("spec.tasks.sleep", 0.05, "c")
    local d = ex2:submit("spec.tasks.sleep", 0.05, "d")
    local done, not_done = procpool.wait({ c, d }, { timeout = T })
    assert.are.same({ c, d }, done)
    assert.are.equal(0, #not_done)
    ex2:shutdown()
  end)

  it("reports stats", function()
    assert.is_true(H.eventually(function() return ex:stats().workers == 2 end, T))
    local st = ex:stats()
    assert.are.same({ workers = 2, pending = 0, running = 0, completed = 0, failed = 0,
      cancelled = 0, worker_restarts = 0, taken_back = 0 }, st)
    ex:submit("spec.tasks.add", 1, 1):result(T)
    pcall(function() ex:submit("spec.tasks.fail", "x"):result(T) end)
    st = ex:stats()
    assert.are.equal(1, st.completed)
    assert.are.equal(1, st.failed)
  end)

  it("knows who it is: current_worker() and cpu_count()", function()
    assert.is_nil(procpool.current_worker())
    local w = ex:submit("spec.tasks.worker"):result(T)
    assert.is_true(w.id == 1 or w.id == 2)
    assert.is_true(w.pid > 0 and w.pid ~= H.pid())
    assert.is_true(procpool.cpu_count() >= 1)
    assert.are.equal("integer", math.type(procpool.cpu_count()))
  end)

  it("processes completions with poll() and reports how many", function()
    local f1 = ex:submit("spec.tasks.add", 1, 1)
    local f2 = ex:submit("spec.tasks.add", 2, 2)
    local n, t0 = 0, core.monotonic()
    while n < 2 and core.monotonic() - t0 < T do n = n + ex:poll(1) end
    assert.are.equal(2, n)
    assert.is_true(f1:done() and f2:done())
    assert.are.equal(0, ex:poll(0))
    -- a wait in between does not hide completions from the next poll
    ex:submit("spec.tasks.add", 3, 3):result(T)
    assert.are.equal(1, ex:poll(0))
    assert.are.equal("r", ex:events())
    assert.is_nil(ex:timeout())
    assert.is_true(math.type(ex:pollfd()) == "integer")
  end)

  describe("with bad arguments", function()
    it("rejects bad options with clear errors", function()
      local function msg(opts)
        local ok, e = pcall(procpool.ProcessPoolExecutor, opts)
        assert.is_false(ok)
        return e
      end
      assert.matches("max_workers must be greater than 0", msg { max_workers = 0 })
      assert.matches("max_workers must be greater than 0", msg { max_workers = -1 })
      assert.matches("max_workers must be greater than 0", msg { max_workers = 1.5 })
      assert.matches("unknown option 'max_worker'", msg { max_worker = 2 })
      assert.matches("initializer must be a callable", msg { initializer = 42 })
      assert.matches("max_tasks_per_child must be an integer >= 1", msg { max_tasks_per_child = 0 })
      assert.matches("unknown context 'threads'", msg { context = "threads" })
      assert.matches("on_worker_lost must be", msg { on_worker_lost = "ignore" })
    end)

    it("rejects bad submit arguments", function()
      local ok, e = pcall(ex.submit, ex, 42)
      assert.is_false(ok)
      assert.matches("bad argument #1 to 'submit' %(function or \"module.name\" string expected, got number%)", e)
      ok, e = pcall(ex.submit_with, ex, { timeout = -1 }, print)
      assert.is_false(ok)
      assert.matches("bad timeout", e)
      ok, e = pcall(ex.submit_with, ex, { deadline = 1 }, print)
      assert.is_false(ok)
      assert.matches("unknown option 'deadline'", e)
    end)
  end)
end)
