-- Submits in a burst go on the engine's inbox without its lock, and a
-- done task's result() is answered without a wait: what they skip must
-- not show. Every task of a burst is counted, cancellable, cancelled or
-- failed as a queued task is, in order; result() and get() give what the
-- full path gives, and a wait's duties (callbacks due) are still done.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 20

local function noop(x) return x end
local function nap(s) require("procpool.core").sleep(s) return s end

--- Both workers busy with `s`-second naps; returns the two futures once
--- both run.
local function occupy(ex, s)
  local a, b = ex:submit(nap, s), ex:submit(nap, s)
  assert.is_true(H.eventually(function() return a:running() and b:running() end, T))
  return a, b
end

--- n submits back to back: a burst (each within microseconds of the last)
local function burst(ex, n, fn)
  local fs = {}
  for i = 1, n do fs[i] = ex:submit(fn or noop, i) end
  return fs
end

describe("the fast paths:", function()
  local ex
  before_each(function() ex = procpool.ProcessPoolExecutor { max_workers = 2 } end)
  after_each(function()
    ex:shutdown { cancel_futures = true }
    collectgarbage()
  end)

  describe("submits in a burst", function()
    it("are all counted as pending at once, and run in order", function()
      local a, b = occupy(ex, 0.5)
      local fs = burst(ex, 500)
      assert.are.equal(500, ex:stats().pending)
      for i = 1, 500 do assert.is_false(fs[i]:running()) end
      a:result(T)
      b:result(T)
      for i = 1, 500 do assert.are.equal(i, fs[i]:result(T)) end
      assert.are.equal(0, ex:stats().pending)
    end)

    it("can each be cancelled the moment it was submitted", function()
      occupy(ex, 0.5)
      local fs = burst(ex, 200)
      local cancelled = {}
      for i = 2, 200, 2 do cancelled[i] = fs[i]:cancel() end
      for i = 1, 200 do
        if i % 2 == 0 then
          assert.is_true(cancelled[i])
          assert.is_true(fs[i]:cancelled())
          local ok, e = pcall(fs[i].result, fs[i], T)
          assert.is_false(ok)
          assert.is_true(procpool.is_error(e, "CancelledError"), tostring(e))
        else
          assert.are.equal(i, fs[i]:result(T))
        end
      end
    end)

    it("are cancelled by shutdown{cancel_futures} right after the burst", function()
      local a, b = occupy(ex, 0.3)
      local fs = burst(ex, 300)
      ex:shutdown { cancel_futures = true }
      assert.are.equal(0.3, a:result(T))
      assert.are.equal(0.3, b:result(T))
      for i = 1, 300 do assert.is_true(fs[i]:cancelled()) end
    end)

    it("run to the end when shutdown waits for them", function()
      occupy(ex, 0.2)
      local fs = burst(ex, 300)
      ex:shutdown()
      for i = 1, 300 do assert.are.equal(i, fs[i]:result(T)) end
    end)

    it("fail as queued tasks do when the workers are killed, and none is lost", function()
      occupy(ex, 5)
      local fs = burst(ex, 300)
      ex:kill_workers()
      for i = 1, 300 do
        assert.is_true(procpool.is_error(fs[i]:exception(T), "BrokenProcessPool"), tostring(i))
      end
      local ok, e = pcall(ex.submit, ex, noop, 1)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "InvalidStateError"), tostring(e))
      assert.is_true(H.eventually(function() return #H.children() == 0 end, T))
    end)

    it("reach idle workers without a wait to hand them out", function()
      -- no result() (whose wait would hand them out itself): the I/O thread
      -- must be woken by the burst
      local fs = burst(ex, 100)
      assert.is_true(H.eventually(function()
        for i = 1, 100 do
          if not fs[i]:done() then return false end
        end
        return true
      end, T))
      for i = 1, 100 do assert.are.equal(i, fs[i]:result(T)) end
    end)

    it("after a quiet spell, as single submits, still complete", function()
      for round = 1, 20 do
        local fs = burst(ex, round)
        for i = 1, round do assert.are.equal(i, fs[i]:result(T)) end
        core.sleep(0.001)
      end
    end)
  end)

  describe("result() of a done task", function()

    it("gives every kind of scalar back exactly, each time", function()
      local vals = { 0, -1, 2 ^ 53, math.maxinteger, math.mininteger, 0.5, -0.0, 1 / 0, true,
        false, "", "text", ("x"):rep(300) }
      local fs = {}
      for i, v in ipairs(vals) do fs[i] = ex:submit(function(x) return x end, v) end
      for i, v in ipairs(vals) do
        for _ = 1, 2 do
          local got = fs[i]:result(T)
          assert.are.equal(math.type(v), math.type(got))
          assert.are.equal(v, got)
        end
      end
      local nan = ex:submit(function() return 0 / 0 end):result(T)
      assert.is_true(nan ~= nan)
    end)

    it("gives nil, several values and tables as the full path does", function()
      assert.are.same({ n = 0 }, table.pack(ex:submit(function() end):result(T)))
      assert.are.same({ n = 1 }, table.pack(ex:submit(function() return nil end):result(T)))
      assert.are.same({ 1, "b", n = 2 }, table.pack(ex:submit(function() return 1, "b" end):result(T)))
      local f = ex:submit(function() return { k = 1 } end)
      local t = f:result(T)
      assert.are.same({ k = 1 }, t)
      assert.are.equal(t, f:result()) -- one object, every call
    end)

    it("raises the task's error unchanged, every time", function()
      local f = ex:submit(function() error({ code = 7 }) end)
      f:exception(T)
      for _ = 1, 2 do
        local ok, e = pcall(f.result, f)
        assert.is_false(ok)
        assert.are.equal(7, e.code)
      end
    end)

    it("names a bad timeout at the caller's line", function()
      local f = ex:submit(noop, 1)
      f:result(T)
      local ok, e = pcall(function() return f:result("soon") end)
      assert.is_false(ok)
      assert.matches("^spec/23%-burst_spec%.lua:%d+: bad timeout to 'result' "
        .. "%(number of seconds expected, got string%)$", e)
    end)

    it("still times out on a task that is not done", function()
      local f = ex:submit(nap, 0.5)
      local ok, e = pcall(f.result, f, 0.01)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "TimeoutError"), tostring(e))
      assert.are.equal(0.5, f:result(T))
    end)

    it("runs the done callbacks due before it returns", function()
      local g = ex:submit(noop, "g")
      local heard
      g:add_done_callback(function(fut) heard = fut:result() end)
      local f = ex:submit(noop, "f")
      assert.is_true(H.eventually(function() return f:done() and g:done() end, T))
      assert.is_nil(heard) -- done() does not run callbacks
      assert.are.equal("f", f:result())
      assert.are.equal("g", heard)
    end)

    it("of an apply_async, through get(), as the full path", function()
      local pool = procpool.Pool { processes = 2 }
      finally(function()
        pool:terminate()
        pool:join()
      end)
      local r = pool:apply_async(noop, { 5 })
      assert.are.equal(5, r:get(T))
      assert.are.equal(5, r:get())
      assert.is_true(r:successful())
      local ok, e = pcall(function() return r:get("soon") end)
      assert.is_false(ok)
      assert.matches("^spec/23%-burst_spec%.lua:%d+: bad timeout to 'get'", e)
      local bad = pool:apply_async(function() error("no") end)
      bad:wait(T)
      local ok2, e2 = pcall(bad.get, bad)
      assert.is_false(ok2)
      assert.matches("no$", e2)
    end)
  end)
end)
