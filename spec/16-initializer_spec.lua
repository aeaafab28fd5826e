-- Initializers and max_tasks_per_child.
local procpool = require "procpool"
local H = require "spec.helper"

local T = 10

describe("initializer", function()
  after_each(function()
    collectgarbage()
    collectgarbage()
  end)

  it("runs once in each worker, with initargs, before its first task (test_initializer)", function()
    local ex = procpool.ProcessPoolExecutor {
      max_workers = 2,
      initializer = function(a, b)
        rawset(_G, "spec_inits", (rawget(_G, "spec_inits") or 0) + 1)
        rawset(_G, "spec_init_value", a .. b)
      end,
      initargs = { "ini", "tialized" },
    }
    local fs = {}
    for i = 1, 8 do
      fs[i] = ex:submit(function()
        require("procpool.core").sleep(0.02)
        return rawget(_G, "spec_init_value"), rawget(_G, "spec_inits")
      end)
    end
    for i = 1, 8 do
      local v, n = fs[i]:result(T)
      assert.are.equal("initialized", v)
      assert.are.equal(1, n)
    end
    ex:shutdown()
  end)

  it("can be named \"module.name\", and keeps nil initargs", function()
    local ex = procpool.ProcessPoolExecutor {
      max_workers = 1, initializer = "spec.tasks.init", initargs = { nil, n = 1 },
    }
    assert.is_nil(ex:submit("spec.tasks.get_init"):result(T))
    ex:shutdown()
    ex = procpool.ProcessPoolExecutor { max_workers = 1, initializer = "spec.tasks.init",
      initargs = { 42 } }
    assert.are.equal(42, ex:submit("spec.tasks.get_init"):result(T))
    ex:shutdown()
  end)

  it("runs in replacement workers too", function()
    local ex = procpool.ProcessPoolExecutor {
      max_workers = 1, max_tasks_per_child = 1, initializer = "spec.tasks.init", initargs = { "again" },
    }
    for _ = 1, 3 do assert.are.equal("again", ex:submit("spec.tasks.get_init"):result(T)) end
    ex:shutdown()
  end)

  it("breaks the pool when it fails: no respawn loop", function()
    local ex = procpool.ProcessPoolExecutor {
      max_workers = 2, initializer = function() error("init exploded") end,
    }
    -- the pool may break before the first submit or after it
    local ok, e = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
    if ok then ok, e = pcall(e.result, e, T) end
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e))
    assert.matches("initializer failed: .*init exploded", e.message)
    local ok2, e2 = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
    assert.is_false(ok2)
    assert.is_true(procpool.is_error(e2, "BrokenProcessPool"))
    assert.matches("init exploded", e2.message)
    assert.is_true(ex:stats().worker_restarts <= 2)
    ex:shutdown()
    assert.are.equal(0, #H.children())
  end)

  it("breaks the pool when workers die in it", function()
    local ex = procpool.ProcessPoolExecutor {
      max_workers = 1, initializer = function() os.exit(3) end,
    }
    local ok, e = pcall(ex.submit, ex, "spec.tasks.add", 1, 2) -- broken before or after
    if ok then e = e:exception(T) end
    assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e))
    ex:shutdown()
    assert.are.equal(0, #H.children())
  end)
end)

describe("max_tasks_per_child", function()
  after_each(function()
    collectgarbage()
    collectgarbage()
  end)

  it("replaces a worker after its N-th task (test_max_tasks_per_child)", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1, max_tasks_per_child = 3 }
    local pids = {}
    for i = 1, 4 do pids[i] = ex:submit("spec.tasks.pid"):result(T) end
    assert.are.equal(pids[1], pids[2])
    assert.are.equal(pids[1], pids[3])
    assert.are_not.equal(pids[1], pids[4])
    ex:shutdown()
  end)

  it("starts replacements while the parent never calls in", function()
    local core = require "procpool.core"
    local ex = procpool.ProcessPoolExecutor { max_workers = 1, max_tasks_per_child = 1 }
    local fs = {}
    for i = 1, 4 do fs[i] = ex:submit("spec.tasks.sleep", 0.02, i) end
    local t0 = core.monotonic()
    local x = 0
    while core.monotonic() - t0 < 1.0 do x = x + 1 end -- busy, no procpool calls
    for i = 1, 4 do assert.is_true(fs[i]:done(), "task " .. i) end
    assert.is_true(ex:stats().worker_restarts == 0)
    ex:shutdown()
  end)

  it("counts failed tasks too", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1, max_tasks_per_child = 2 }
    local p1 = ex:submit("spec.tasks.pid"):result(T)
    ex:submit("spec.tasks.fail", "x"):exception(T)
    local p2 = ex:submit("spec.tasks.pid"):result(T)
    assert.are_not.equal(p1, p2)
    ex:shutdown()
  end)

  for _, case in ipairs({ { 1, 2, 6 }, { 2, 2, 8 }, { 3, 1, 6 } }) do
    it(string.format("completes a backlog (W=%d, N=%d, %d tasks; gh-115634)", case[1], case[2],
      case[3]), function()
      local ex = procpool.ProcessPoolExecutor { max_workers = case[1], max_tasks_per_child = case[2] }
      local fs = {}
      for i = 1, case[3] do fs[i] = ex:submit("spec.tasks.sleep", 0.01, i) end
      ex:shutdown()
      for i = 1, case[3] do assert.are.equal(i, fs[i]:result(0)) end
    end)
  end

  it("counts tasks, not chunks, in map", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1, max_tasks_per_child = 2 }
    local pids, n = {}, 0
    for _, pid in ex:map(function() return require("procpool").current_worker().pid end,
      { 1, 2, 3, 4, 5, 6, 7, 8 }, { chunksize = 4, timeout = T }) do
      if not pids[pid] then
        pids[pid] = true
        n = n + 1
      end
    end
    assert.are.equal(4, n)
    ex:shutdown()
  end)
end)
