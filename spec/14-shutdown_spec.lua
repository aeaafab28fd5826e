-- Shutdown, close, garbage collection, forced termination: and that no
-- worker, zombie or fd is left behind.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 10
local build = os.getenv("PROCPOOL_BUILD") or "build"
local prelude = "package.path = 'lua/?.lua;lua/?/init.lua;./?.lua;' .. package.path\n"
  .. "package.cpath = '" .. build .. "/?.so;' .. package.cpath\n"

local function alive(pid)
  local s = H.proc_state(pid)
  return s ~= nil and s ~= "Z"
end

local function worker_pids(ex, n)
  local pids, fs = {}, {}
  for i = 1, n do
    fs[i] = ex:submit(function()
      require("procpool.core").sleep(0.05)
      return require("procpool").current_worker().pid
    end)
  end
  for i = 1, n do pids[fs[i]:result(T)] = true end
  local list = {}
  for p in pairs(pids) do list[#list + 1] = p end
  return list
end

describe("shutdown", function()
  after_each(function()
    collectgarbage()
    collectgarbage()
  end)

  it("waits for all queued work (test_hang_issue12364)", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    local fs = {}
    for i = 1, 50 do fs[i] = ex:submit("spec.tasks.sleep", 0.01, i) end
    ex:shutdown()
    for i = 1, 50 do
      assert.is_true(fs[i]:done())
      assert.are.equal(i, fs[i]:result(0))
    end
  end)

  it("cancels what has not started with cancel_futures (test_cancel_futures)", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    local fs = {}
    for i = 1, 50 do fs[i] = ex:submit("spec.tasks.sleep", 0.05, i) end
    assert.is_true(H.eventually(function() return fs[1]:running() end, T))
    ex:shutdown { cancel_futures = true }
    local cancelled, ok = 0, 0
    for i = 1, 50 do
      assert.is_true(fs[i]:done())
      if fs[i]:cancelled() then
        cancelled = cancelled + 1
      else
        assert.is_nil(fs[i]:exception(0))
        ok = ok + 1
      end
    end
    assert.is_true(cancelled > 20, "cancelled " .. cancelled)
    assert.is_true(ok >= 1)
  end)

  it("returns at once with wait = false, and the futures still complete", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    local fs = {}
    for i = 1, 3 do fs[i] = ex:submit("spec.tasks.sleep", 0.3, i) end
    local t0 = core.monotonic()
    ex:shutdown { wait = false }
    assert.is_true(core.monotonic() - t0 < 0.1)
    for i = 1, 3 do assert.are.equal(i, fs[i]:result(T)) end
    ex:shutdown() -- and a later wait finds everything gone
    assert.are.equal(0, #H.children())
  end)

  it("refuses new work afterwards, and is idempotent (test_run_after_shutdown)", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    ex:shutdown()
    ex:shutdown()
    ex:shutdown { wait = false, cancel_futures = true }
    local ok, e = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "InvalidStateError"))
    assert.are.equal("cannot schedule new futures after shutdown", e.message)
  end)

  it("does not hang after a cancelled submit (test_hang_gh94440)", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    local busy = {}
    for i = 1, 3 do busy[i] = ex:submit("spec.tasks.sleep", 0.1) end
    busy[3]:cancel()
    local t0 = core.monotonic()
    ex:shutdown()
    assert.is_true(core.monotonic() - t0 < 2)
  end)

  it("survives a map followed by an immediate shutdown (test_shutdown_race_issue12456)", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    local iter = ex:map("spec.tasks.square", { 1, 2, 3 }, { timeout = T })
    iter()
    ex:shutdown()
  end)

  it("is what <close> does", function()
    local fs = {}
    do
      local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2 }
      for i = 1, 4 do fs[i] = ex:submit("spec.tasks.sleep", 0.05, i) end
    end
    for i = 1, 4 do assert.is_true(fs[i]:done()) end
    assert.are.equal(0, #H.children())
  end)

  it("leaves no worker, zombie or zygote behind", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    local pids = worker_pids(ex, 4)
    local kids = H.children()
    assert.are.equal(1, #kids) -- the zygote; workers are its children
    ex:shutdown()
    assert.are.equal(0, #H.children())
    for _, p in ipairs(pids) do assert.is_nil(H.proc_state(p), "worker " .. p .. " remains") end
    assert.is_nil(H.proc_state(kids[1]))
  end)

  it("cleans up an executor dropped without shutdown (test_del_shutdown)", function()
    local f, pids
    do
      local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
      pids = worker_pids(ex, 2)
      f = ex:submit("spec.tasks.sleep", 0.2, "still runs")
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal("still runs", f:result(T))
    assert.is_true(H.eventually(function() return #H.children() == 0 end, T))
    for _, p in ipairs(pids) do
      assert.is_true(H.eventually(function() return not alive(p) end, T))
    end
  end)

  it("leaks no fds over many lifecycles", function()
    -- counted once what earlier specs left has ended (a pool dropped
    -- without shutdown closes its fds when its last worker is reaped)
    local before
    assert.is_true(H.eventually(function()
      collectgarbage()
      local n = H.fd_count()
      core.sleep(0.05)
      before = H.fd_count()
      return n == before and #H.children() == 0
    end, T))
    for _ = 1, 20 do
      local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
      ex:submit("spec.tasks.add", 1, 2):result(T)
      ex:shutdown()
    end
    assert.is_true(H.eventually(function()
      collectgarbage()
      return H.fd_count() == before
    end, T), "fds before: " .. before .. ", now: " .. H.fd_count())
    for _ = 1, 5 do
      local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
      ex:submit("spec.tasks.add", 1, 2):result(T)
    end
    collectgarbage()
    collectgarbage()
    assert.is_true(H.eventually(function()
      collectgarbage()
      return H.fd_count() == before and #H.children() == 0
    end, T))
  end)

  describe("terminate_workers / kill_workers", function()
    for _, how in ipairs({ "terminate_workers", "kill_workers" }) do
      it(how .. " stops running work at once (test_force_shutdown_workers)", function()
        local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
        local marker = os.tmpname()
        os.remove(marker)
        local running = ex:submit(function(path)
          require("procpool.core").sleep(3)
          local f = io.open(path, "w") f:write("finished") f:close()
        end, marker)
        local queued = {}
        for i = 1, 5 do queued[i] = ex:submit("spec.tasks.sleep", 3) end
        assert.is_true(H.eventually(function() return running:running() end, T))
        core.sleep(0.1)
        local t0 = core.monotonic()
        ex[how](ex)
        assert.is_true(core.monotonic() - t0 < 2.5)
        local ok, e = pcall(running.result, running, T)
        assert.is_false(ok)
        assert.is_true(procpool.is_error(e, "BrokenProcessPool"), tostring(e))
        for i = 1, 5 do
          assert.is_true(procpool.is_error(queued[i]:exception(T), "BrokenProcessPool"))
        end
        local ok2, e2 = pcall(ex.submit, ex, "spec.tasks.add", 1, 1)
        assert.is_false(ok2)
        assert.is_true(procpool.is_error(e2, "InvalidStateError"))
        assert.are.equal(0, #H.children())
        core.sleep(0.1)
        assert.is_nil(io.open(marker))
        ex[how](ex) -- again: a quiet no-op
      end)
    end
  end)

  it("finishes in lua_close: workers stopped, no orphans", function()
    local ok, out = H.run_lua(prelude .. [[
      local procpool = require "procpool"
      local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
      local pids = {}
      for i = 1, 2 do
        pids[i] = ex:submit(function() require("procpool.core").sleep(0.05) return require("procpool").current_worker().pid end):result(10)
      end
      ex:submit("spec.tasks.sleep", 30)
      io.write(table.concat(pids, " "))
    ]], 20)
    assert.is_true(ok)
    for p in out:gmatch("%d+") do
      assert.is_true(H.eventually(function() return not alive(tonumber(p)) end, 3), "orphan " .. p)
    end
  end)

  it("lets a script end with work still queued, promptly", function()
    local t0 = core.monotonic()
    local ok = H.run_lua(prelude .. [[
      local procpool = require "procpool"
      local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
      for i = 1, 10 do ex:submit("spec.tasks.sleep", 5) end
    ]], 20)
    assert.is_true(ok)
    assert.is_true(core.monotonic() - t0 < 5)
  end)
end)
