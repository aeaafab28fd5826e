-- Future: states, result/exception/timeouts, cancel, done callbacks.
-- Ported from CPython's test_future where it applies.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 10

-- Futures in each state, from a fresh one-worker executor whose worker is
-- held by a long task. A fresh executor knows no task durations yet, so it
-- hands out one task at a time and the later ones wait (pending); after a
-- quick task its window is deep and all of them may be handed out at once.
local function fixtures(ex)
  local blocker = ex:submit("spec.tasks.sleep", 1.0)
  local f = { blocker = blocker }
  f.ok = ex:submit("spec.tasks.add", 40, 2)
  f.err = ex:submit("spec.tasks.fail", "oops")
  for i = 1, 12 do f[i] = ex:submit("spec.tasks.sleep", 0.01, i) end
  f.pending = f[12]
  f.cancelled = f[11]
  assert.is_true(f.cancelled:cancel())
  return f
end

describe("Future", function()
  local ex
  before_each(function() ex = procpool.ProcessPoolExecutor { max_workers = 1 } end)
  after_each(function()
    ex:shutdown { cancel_futures = true }
    collectgarbage()
    collectgarbage()
  end)

  it("has the state predicates of FS-9", function()
    local f = fixtures(ex)
    assert.is_true(H.eventually(function() return f.blocker:running() end, T))
    assert.are.same({ false, false, false },
      { f.pending:done(), f.pending:running(), f.pending:cancelled() })
    assert.are.same({ false, true, false },
      { f.blocker:done(), f.blocker:running(), f.blocker:cancelled() })
    assert.are.same({ true, false, true },
      { f.cancelled:done(), f.cancelled:running(), f.cancelled:cancelled() })
    f.ok:result(T)
    f.err:exception(T)
    assert.are.same({ true, false, false }, { f.ok:done(), f.ok:running(), f.ok:cancelled() })
    assert.are.same({ true, false, false }, { f.err:done(), f.err:running(), f.err:cancelled() })
    assert.matches("procpool.Future: 0x%x+ %(finished%)", tostring(f.ok))
    assert.matches("%(cancelled%)", tostring(f.cancelled))
  end)

  it("cancels per FS-3..FS-5", function()
    local f = fixtures(ex)
    assert.is_true(H.eventually(function() return f.blocker:running() end, T))
    assert.is_true(f.pending:cancel())
    assert.is_true(f.pending:cancel()) -- again: still true
    assert.is_true(f.cancelled:cancel())
    assert.is_false(f.blocker:cancel()) -- running
    assert.is_false(f.blocker:cancelled())
    f.ok:result(T)
    assert.is_false(f.ok:cancel()) -- finished
    assert.are.equal(42, f.ok:result(0))
  end)

  it("result(0) never blocks: TO-2, TO-3", function()
    local f = fixtures(ex)
    local t0 = core.monotonic()
    local ok, e = pcall(f.pending.result, f.pending, 0)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "TimeoutError"))
    ok, e = pcall(f.blocker.result, f.blocker, 0)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "TimeoutError"))
    ok, e = pcall(f.cancelled.result, f.cancelled, 0)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "CancelledError"))
    assert.is_true(core.monotonic() - t0 < 0.2)
    assert.are.equal(42, f.ok:result(T))
    f.err:exception(T)
    ok, e = pcall(f.err.result, f.err, 0)
    assert.is_false(ok)
    assert.are.equal("oops", e)
    ok, e = pcall(f.pending.result, f.pending, -1) -- negative is 0
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "TimeoutError"))
  end)

  it("exception() mirrors result() without raising the task's error: TO-8", function()
    local f = fixtures(ex)
    assert.is_true(procpool.is_error(select(2, pcall(f.pending.exception, f.pending, 0)),
      "TimeoutError"))
    assert.is_true(procpool.is_error(select(2, pcall(f.cancelled.exception, f.cancelled, 0)),
      "CancelledError"))
    assert.are.equal("oops", f.err:exception(T))
    assert.is_nil(f.ok:exception(T))
  end)

  it("times out promptly and stays usable: TO-1, TO-9", function()
    local f = ex:submit("spec.tasks.sleep", 0.3, "late")
    local t0 = core.monotonic()
    local ok, e = pcall(f.result, f, 0.1)
    local waited = core.monotonic() - t0
    assert.is_false(ok)
    assert.are.equal("TimeoutError", e.name)
    assert.is_true(waited >= 0.09 and waited < 0.25, "waited " .. waited)
    assert.is_false(f:cancelled())
    assert.are.equal("late", f:result(T))
  end)

  it("gives the same values at every result() and exception() call", function()
    local cancelled = fixtures(ex).cancelled
    local plain = ex:submit("spec.tasks.echo", 1, 2.5, "s", true, nil)
    local one = ex:submit("spec.tasks.echo", { k = "v" })
    local fn = ex:submit("spec.tasks.echo", function() return 7 end)
    local several = ex:submit("spec.tasks.echo", { 1 }, "x", { 2 })
    local err = ex:submit("spec.tasks.fail", { why = "oops" })
    for _ = 1, 2 do
      assert.are.same({ 1, 2.5, "s", true, nil, n = 5 }, table.pack(plain:result(T)))
    end
    local t = one:result(T)
    collectgarbage()
    collectgarbage()
    assert.are.equal(t, one:result(T))
    assert.are.same({ k = "v" }, t)
    assert.are.equal(fn:result(T), fn:result(T))
    assert.are.equal(7, fn:result(T)())
    local a, x, b = several:result(T)
    collectgarbage()
    local a2, x2, b2 = several:result(T)
    assert.are.same({ { 1 }, "x", { 2 } }, { a, x, b })
    assert.are.same({ a, "x", b }, { a2, x2, b2 })
    assert.is_true(a == a2 and b == b2)
    local e = err:exception(T)
    collectgarbage()
    assert.are.equal(e, err:exception(T))
    assert.are.equal(e, select(2, pcall(err.result, err, T)))
    assert.are.same({ why = "oops" }, e)
    local c = select(2, pcall(cancelled.exception, cancelled, T))
    assert.is_true(procpool.is_error(c, "CancelledError"))
    assert.are.equal(c, select(2, pcall(cancelled.result, cancelled, T)))
    -- a value nobody holds any more may be decoded again: equal contents
    collectgarbage()
    collectgarbage()
    assert.are.same({ k = "v" }, one:result(T))
  end)

  it("wakes a waiting coroutine at once when cancelled (no gh-92001 hang)", function()
    local yielded = {}
    procpool.set_waiter(function(fd)
      yielded[#yielded + 1] = fd
      coroutine.yield()
    end)
    local f = fixtures(ex)
    local results = {}
    local cos = {}
    for k = 1, 3 do
      cos[k] = coroutine.create(function()
        local ok, e = pcall(f.pending.result, f.pending, T)
        results[k] = ok and "ok" or e.name
      end)
      coroutine.resume(cos[k])
    end
    procpool.set_waiter(nil)
    assert.are.equal(3, #yielded)
    assert.is_true(f.pending:cancel())
    for k = 1, 3 do coroutine.resume(cos[k]) end
    assert.are.same({ "CancelledError", "CancelledError", "CancelledError" }, results)
  end)

  describe("done callbacks", function()
    it("run once, with the future, after it is done: CB-1, CB-2", function()
      local calls = {}
      local f = ex:submit("spec.tasks.add", 2, 3)
      f:add_done_callback(function(g) calls[#calls + 1] = { "a", g == f, g:result(0) } end)
      f:add_done_callback(function(g) calls[#calls + 1] = { "b", g:done() } end)
      f:result(T)
      ex:submit("spec.tasks.add", 0, 0):result(T) -- another wait: no second call
      assert.are.same({ { "a", true, 5 }, { "b", true } }, calls)
    end)

    it("run at once when added to a done future: CB-3", function()
      local f = ex:submit("spec.tasks.fail", "bad")
      f:exception(T)
      local seen
      f:add_done_callback(function(g) seen = g:exception(0) end)
      assert.are.equal("bad", seen)
      ex:shutdown { cancel_futures = true }
      ex = procpool.ProcessPoolExecutor { max_workers = 1 } -- fresh: see fixtures
      local c = fixtures(ex).cancelled
      local was
      c:add_done_callback(function(g) was = g:cancelled() end)
      assert.is_true(was)
    end)

    it("run in the canceller when the future is cancelled", function()
      local f = fixtures(ex)
      local n = 0
      f.pending:add_done_callback(function(g) n = n + 1 assert(g:cancelled()) end)
      assert.are.equal(0, n)
      f.pending:cancel()
      assert.are.equal(1, n)
      f.pending:cancel()
      procpool.wait({ f.ok }, { timeout = T })
      assert.are.equal(1, n)
    end)

    it("run in the parent's Lua thread", function()
      local where
      local f = ex:submit("spec.tasks.add", 1, 1)
      f:add_done_callback(function() where = procpool.current_worker() or H.pid() end)
      f:result(T)
      assert.are.equal(H.pid(), where)
    end)

    it("may submit more work: CB-8", function()
      local chained
      local f = ex:submit("spec.tasks.add", 1, 1)
      f:add_done_callback(function(g) chained = ex:submit("spec.tasks.add", g:result(0), 10) end)
      f:result(T)
      assert.are.equal(12, chained:result(T))
    end)

    it("report an error on stderr and keep going: CB-6", function()
      local ok, out, err = H.run_lua([[
        package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
        package.cpath = "]] .. (os.getenv("PROCPOOL_BUILD") or "build") .. [[/?.so;" .. package.cpath
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
        local f = ex:submit(function() return 7 end)
        local second = false
        f:add_done_callback(function() error("doh!") end)
        f:add_done_callback(function() second = true end)
        io.write(f:result(10), " ", tostring(second), " ")
        io.write(ex:submit(function() return 8 end):result(10))
        ex:shutdown()
      ]])
      assert.is_true(ok)
      assert.are.equal("7 true 8", out)
      assert.matches("exception calling callback for procpool.Future: 0x%x+ %(finished%): .*doh!",
        err)
    end)
  end)

  describe("with bad arguments", function()
    it("rejects a non-function callback and a bad timeout", function()
      local f = ex:submit("spec.tasks.add", 1, 1)
      assert.has_error(function() f:add_done_callback(42) end)
      local ok, e = pcall(f.result, f, "soon")
      assert.is_false(ok)
      assert.matches("bad timeout to 'result'", e)
      f:result(T)
    end)
  end)
end)
