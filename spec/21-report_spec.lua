-- Progress reports from tasks: procpool.report, f:add_progress_callback,
-- f:progress(), and the maps' on_report option and bar.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 10

-- reports 1..n, each after `gap` seconds, then returns "done"
local function steps(n, gap)
  local report, sleep = require("procpool").report, require("procpool.core").sleep
  for i = 1, n do
    sleep(gap)
    report(i)
  end
  return "done"
end

local function lua_script(body)
  return [[
    package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
    package.cpath = "]] .. (os.getenv("PROCPOOL_BUILD") or "build") .. [[/?.so;" .. package.cpath
    local procpool = require "procpool"
  ]] .. body
end

for _, context in ipairs { "fork", "spawn" } do
  describe("procpool.report (" .. context .. ")", function()
    local ex
    before_each(function()
      ex = procpool.ProcessPoolExecutor { max_workers = 2, context = context }
    end)
    after_each(function()
      ex:shutdown()
      collectgarbage()
      collectgarbage()
    end)

    it("delivers reports in order, during the wait, before the done callbacks", function()
      local f = ex:submit(steps, 5, 0.03) -- spaced wider than the rate limit: all go
      local got = {}
      f:add_progress_callback(function(g, i)
        assert.are.equal(f, g)
        got[#got + 1] = i
      end)
      f:add_done_callback(function() got[#got + 1] = "end" end)
      assert.are.equal("done", f:result(T))
      assert.are.same({ 1, 2, 3, 4, 5, "end" }, got)
      assert.are.equal(5, f:progress())
    end)

    it("coalesces a tight loop of reports: cheap per call, in order, the last one arrives", function()
      local f = ex:submit(function(n)
        local report, now = require("procpool").report, require("procpool.core").monotonic
        local t0 = now()
        for i = 1, n do report(i) end
        return (now() - t0) / n
      end, 100000)
      local got, ordered = 0, true
      local last = 0
      f:add_progress_callback(function(_, i)
        got = got + 1
        if i <= last then ordered = false end
        last = i
      end)
      local per_call = f:result(T)
      assert.are.equal(100000, last)
      assert.is_true(ordered)
      assert.is_true(got < 1000, "delivered " .. got .. " of 100000")
      -- a few hundred ns without sanitizers; a bound that holds under them
      assert.is_true(per_call < 20e-6, "per call: " .. per_call)
    end)

    it("sends a report held by the rate limit once the interval ends, while the task runs", function()
      local f = ex:submit(function()
        local report = require("procpool").report
        report("a")
        report("b") -- within the interval: held, then sent by the worker's flusher
        require("procpool.core").sleep(1)
        return 1
      end)
      assert.is_true(H.eventually(function() return f:progress() == "b" end, 0.8))
      assert.is_false(f:done())
      f:result(T)
    end)

    it("sends the held report just before its item's result", function()
      local f = ex:submit(function()
        local report = require("procpool").report
        require("procpool.core").sleep(0.1) -- the callbacks are in place by then
        report("a")
        report("b")
        report("c")
        return 1
      end)
      local got = {}
      f:add_progress_callback(function(_, v) got[#got + 1] = v end)
      f:add_done_callback(function() got[#got + 1] = "end" end)
      f:result(T)
      assert.are.same({ "a", "c", "end" }, got)
    end)

    it("delivers the reports of a task that then fails", function()
      local f = ex:submit(function()
        local report = require("procpool").report
        require("procpool.core").sleep(0.1)
        report("a")
        require("procpool.core").sleep(0.03)
        report("b")
        error("boom", 0)
      end)
      local got = {}
      f:add_progress_callback(function(_, v) got[#got + 1] = v end)
      assert.are.equal("boom", f:exception(T))
      assert.are.same({ "a", "b" }, got)
      assert.are.equal("b", f:progress())
    end)

    it("sends tables and several values, as results", function()
      local f = ex:submit(function()
        require("procpool").report({ done = 3, of = { 1, 2 } }, "phase", nil, true)
        return 1
      end)
      local got
      f:add_progress_callback(function(_, ...) got = table.pack(...) end)
      f:result(T)
      assert.are.same({ done = 3, of = { 1, 2 } }, got[1])
      assert.are.same({ "phase", nil, true }, { got[2], got[3], got[4] })
      assert.are.equal(4, got.n)
      assert.are.equal(4, select("#", f:progress()))
    end)

    it("raises a SerializationError naming the report in the task", function()
      local f = ex:submit(function()
        local ok, e = pcall(require("procpool").report, 1, coroutine.create(print))
        return ok, e.name, e.message
      end)
      local ok, name, msg = f:result(T)
      assert.is_false(ok)
      assert.are.equal("SerializationError", name)
      assert.matches("report%[2%]", msg)
      local g = ex:submit(function() require("procpool").report(io.stdout) end)
      assert.are.equal("SerializationError", g:exception(T).name)
    end)

    it("gives a late callback the latest report at once, and after the end too", function()
      local f = ex:submit(function()
        require("procpool").report("first")
        require("procpool.core").sleep(0.3)
        require("procpool").report("second")
        return 1
      end)
      assert.is_true(H.eventually(function() return f:progress() == "first" end, T))
      local got = {}
      f:add_progress_callback(function(_, v) got[#got + 1] = v end)
      assert.are.same({ "first" }, got)
      f:result(T)
      assert.are.same({ "first", "second" }, got)
      local late
      f:add_progress_callback(function(_, v) late = v end)
      assert.are.equal("second", late)
    end)

    it("has no progress before a report, and no callback call", function()
      local f = ex:submit(function() return 1 end)
      local called = false
      f:add_progress_callback(function() called = true end)
      f:result(T)
      assert.are.equal(0, select("#", f:progress()))
      assert.is_false(called)
    end)

    it("is a no-op outside a task: in the parent, in an initializer", function()
      assert.are.equal(0, select("#", procpool.report("ignored")))
      local ex2 = procpool.ProcessPoolExecutor {
        max_workers = 1, context = context,
        initializer = function() require("procpool").report("from init") end,
      }
      local f = ex2:submit(function() return 1 end)
      assert.are.equal(1, f:result(T))
      assert.are.equal(0, select("#", f:progress()))
      ex2:shutdown()
    end)

    it("calls the map option on_report(index, ...) for each item's reports", function()
      local seen = {}
      local function task(x)
        require("procpool").report(x * 10, "x")
        return x
      end
      local items = H.range(20)
      for i, v in ex:map(task, items, { timeout = T, on_report = function(i, r, s)
        seen[i] = r .. s
      end }) do
        assert.are.equal(i, v)
        assert.are.equal(i * 10 .. "x", seen[i]) -- delivered before its item is yielded
      end
      for i = 1, 20 do assert.are.equal(i * 10 .. "x", seen[i]) end
    end)
  end)
end

describe("reports", function()
  local ex, pool
  before_each(function()
    ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    pool = procpool.Pool { processes = 2 }
  end)
  after_each(function()
    ex:shutdown()
    pool:close()
    pool:join()
    collectgarbage()
    collectgarbage()
  end)

  local function task(x)
    require("procpool").report(-x)
    return x
  end

  it("reach on_report in Pool map, starmap, imap and imap_unordered", function()
    local function collect(call)
      local got = {}
      call(function(i, r) got[#got + 1] = i .. ":" .. r end)
      table.sort(got)
      return table.concat(got, " ")
    end
    local want = "1:-1 2:-2 3:-3 4:-4"
    assert.are.equal(want, collect(function(cb)
      assert.are.equal(4, pool:map_async(task, H.range(4), { chunksize = 3, on_report = cb })
        :get(T).n)
    end))
    assert.are.equal(want, collect(function(cb)
      pool:starmap_async(task, { { 1 }, { 2 }, { 3 }, { 4 } }, { on_report = cb }):get(T)
    end))
    assert.are.equal(want, collect(function(cb)
      pool:map_async(task, H.range(4), { on_report = cb }):get(T)
    end))
    assert.are.equal(want, collect(function(cb)
      for _ in pool:imap(task, H.range(4), { on_report = cb, timeout = T }) do end
    end))
    assert.are.equal(want, collect(function(cb)
      for _ in pool:imap_unordered(task, H.range(4), { chunksize = 2, on_report = cb, timeout = T })
      do end
    end))
  end)

  it("gives a map chunk's listener every report, also when all came before the caller looked",
    function()
      -- a chunk heard from its submit, whose reports all came before the
      -- caller looked: every item's report is delivered, not only the latest
      local got = {}
      local fut = ex:_submit_chunk(task, { 1, 2, 3 }, 1, 3, false, nil, nil,
        function(_, k, r) got[#got + 1] = k .. ":" .. r end)
      assert.is_true(H.eventually(function() return fut:done() end, T))
      require("procpool.core").drain()
      table.sort(got)
      assert.are.equal("1:-1 2:-2 3:-3", table.concat(got, " "))
    end)

  it("refuses an on_report that is not a function", function()
    assert.has_error(function() ex:map(task, { 1 }, { on_report = 1 }) end,
      "bad on_report option to 'map' (a function expected)")
    assert.has_error(function() pool:map_async(task, { 1 }, { on_report = "x" }) end,
      "bad on_report option to 'map_async' (a function expected)")
  end)

  it("reach an apply_async result's progress callbacks", function()
    local r = pool:apply_async(function()
      require("procpool").report(0.5, "half")
      return 7
    end)
    local got
    r:add_progress_callback(function(rr, x, s) got = { rr == r, x, s } end)
    assert.are.equal(7, r:get(T))
    assert.are.same({ true, 0.5, "half" }, got)
    assert.are.same({ 0.5, "half" }, { r:progress() })
    local m = pool:map_async(task, { 1 })
    local ok, e = pcall(m.progress, m)
    assert.is_false(ok)
    assert.are.equal("InvalidStateError", e.name)
    m:get(T)
    assert.has_error(function() r:add_progress_callback(1) end)
  end)

  it("run progress callbacks from ex:poll", function()
    local f = ex:submit(steps, 3, 0.03)
    local got = {}
    f:add_progress_callback(function(_, i) got[#got + 1] = i end)
    assert.is_true(H.eventually(function()
      ex:poll(0.05)
      return #got == 3
    end, T))
    assert.are.same({ 1, 2, 3 }, got)
    f:result(T)
  end)

  it("checks add_progress_callback's argument", function()
    local f = ex:submit(function() return 1 end)
    assert.has_error(function() f:add_progress_callback("nope") end)
    f:result(T)
  end)

  it("reports a raising progress callback on stderr; the others still run", function()
    local ok, out, err = H.run_lua(lua_script([[
      local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
      local f = ex:submit(function() require("procpool").report(1) return 2 end)
      local n = 0
      f:add_progress_callback(function() error("cb failed") end)
      f:add_progress_callback(function(_, v) n = n + v end)
      io.write(f:result(10), " ", n)
      ex:shutdown()
    ]]))
    assert.is_true(ok)
    assert.are.equal("2 1", out)
    assert.matches("procpool: exception calling progress callback for procpool.Future: "
      .. "[^\n]*cb failed", err)
  end)

  it("counts running items by their reported fraction on the progress bar", function()
    local script = os.tmpname()
    local f = io.open(script, "w")
    f:write(lua_script([[
      local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
      local function half(x)
        require("procpool").report(0.5)
        require("procpool.core").sleep(0.3)
        return x
      end
      for _ in ex:map(half, { 1 }, { progress = true, timeout = 10 }) do end
      ex:shutdown()
    ]]))
    f:close()
    local p = io.popen("timeout 30 script -qec 'lua5.4 " .. script .. "' /dev/null")
    local out = p:read("a")
    p:close()
    os.remove(script)
    assert.matches("%] 0/1  50%%", out)
    assert.matches("%] 1/1 100%%", out)
  end)

  it("keeps the reports of a map item nobody listens to out of the parent", function()
    -- a chunk's future drops its items' reports: nothing is kept for them
    local fut = ex:_submit_chunk(task, { 1, 2 }, 1, 2, false, nil, nil, false)
    fut:result(T)
    assert.are.equal(0, select("#", fut:progress()))
    local kept = ex:_submit_chunk(task, { 1, 2 }, 1, 2, false, nil, nil, function() end)
    kept:result(T)
    assert.are.equal(-2, kept:progress())
  end)
end)

describe("report's cost", function()
  it("is nothing in the parent", function()
    local t0 = core.monotonic()
    for i = 1, 100000 do procpool.report(i) end
    assert.is_true(core.monotonic() - t0 < 1)
  end)
end)
