-- Regression: Ctrl-C in `procpool map` was lost now and then (the CI's
-- Ctrl-C spec timed out: the run went on over its endless input). lua.c's
-- SIGINT handler sets a hook that raises "interrupted!" at the next call
-- and then removes itself. When that call was inside one of the library's
-- protected calls, the interrupt became a result: decoding a result (a
-- record's failure, "cannot deserialize"), a callback's error (said on
-- stderr), a __serialize or a constructor (a SerializationError), the
-- CLI's reduce (a failed record).
--
-- Here the hook is lua.c's, with the moment chosen: it raises at the k-th
-- call from the start of an operation, for every k up to the calls the
-- operation makes. Each time the interrupt must come out as it is, and
-- the future, the pool and the callbacks must be as good as before.
local procpool = require "procpool"
local core = require "procpool.core"

-- lua.c's Ctrl-C: at the k-th call from now, remove the hook and raise;
-- `shot.fired` tells whether it came
local function interrupt_at(k, shot)
  local n = 0
  debug.sethook(function()
    n = n + 1
    if n == k then
      debug.sethook()
      shot.fired = true
      error("interrupted!")
    end
  end, "c")
end

-- fn() with the interrupt at its k-th call -> ok, error or results,
-- whether the interrupt came (fn may have ended before its k-th call)
local function call_with_interrupt(k, fn)
  local shot = { fired = false }
  local ok, r = pcall(function()
    interrupt_at(k, shot)
    local res = table.pack(fn())
    debug.sethook()
    return res
  end)
  debug.sethook()
  return ok, r, shot.fired
end

-- fn() interrupted at each of its calls in turn, until one run ends
-- before the interrupt comes (how many calls a wait makes depends on
-- timing): every time it came, it must come out as it is. `after(k)`
-- checks what must still hold. Returns the number of calls swept.
local function sweep(fn, after)
  for k = 1, 100000 do
    local ok, e, fired = call_with_interrupt(k, fn)
    if not fired then
      assert(ok, "the operation fails without an interrupt: " .. tostring(e))
      assert.is_true(k > 3, "calls: " .. k - 1)
      return k - 1
    end
    assert.is_false(ok, "call " .. k .. ": no interrupt came out")
    assert.is_true(core.is_interrupt(e), "call " .. k .. ": came out as " .. tostring(e))
    if after then after(k) end
  end
  error("the sweep did not end")
end

-- wait for the futures (10 s at most)
local function settle(...)
  local fs = { ... }
  procpool.wait(fs, { timeout = 10 })
  for _, f in ipairs(fs) do assert(f:done(), "not done in 10 s") end
end

-- a value that travels by a constructor of this process
local point_mt = {}
_G.procpool_spec_point = function(x, y) return setmetatable({ x = x, y = y }, point_mt) end
point_mt.__serialize = function(p) return "procpool_spec_point", p.x, p.y end

describe("regression: Ctrl-C inside the library's protected calls", function()
  local ex
  setup(function() ex = procpool.ProcessPoolExecutor { max_workers = 2 } end)
  teardown(function()
    ex:shutdown()
    _G.procpool_spec_point = nil
  end)

  it("core.is_interrupt knows lua.c's message, with or without a position", function()
    assert.is_true(core.is_interrupt("interrupted!"))
    assert.is_true(core.is_interrupt("script.lua:12: interrupted!"))
    assert.is_false(core.is_interrupt("the task was interrupted! twice"))
    assert.is_false(core.is_interrupt("not interrupted!"))
    assert.is_false(core.is_interrupt(core.error("WorkerLost", "interrupted!")))
    assert.is_false(core.is_interrupt(nil))
  end)

  it("while a result is decoded: raised, and the future decodes it after", function()
    local f = ex:submit(function() return { 1, { 2, 3 }, s = ("x"):rep(100) }, "two" end)
    settle(f)
    local function fresh() -- a future whose value is not cached yet
      local g = ex:submit(function() return { 1, { 2, 3 } } end)
      settle(g)
      return g
    end
    local g = fresh()
    sweep(function() return g:result() end, function()
      assert.are.same({ 1, { 2, 3 } }, g:result())
      g = fresh()
    end)
    -- exception() returns a task's error: an interrupt is not one
    g = fresh()
    sweep(function() return g:exception() end, function()
      assert.is_nil(g:exception())
      g = fresh()
    end)
    local a, b = f:result()
    assert.are.same({ 1, { 2, 3 }, s = ("x"):rep(100) }, a)
    assert.are.equal("two", b)
  end)

  it("inside a constructor of this process: raised, not a SerializationError", function()
    local function fresh()
      local g = ex:submit(function(p) return p end, _G.procpool_spec_point(1, 2))
      settle(g)
      return g
    end
    local g = fresh()
    sweep(function() return g:result() end, function()
      local v = g:result() -- the one interrupted decodes as well after
      assert.are.same({ 1, 2 }, { v.x, v.y })
      g = fresh()
    end)
  end)

  it("inside __serialize at submit: raised, not a SerializationError; nothing queued", function()
    local arg = setmetatable({}, { __serialize = function() return "procpool_spec_point", 5, 6 end })
    local function tasks() -- every task the executor has taken
      local st = ex:stats()
      return st.pending + st.running + st.completed + st.failed + st.cancelled
    end
    local before, returned = tasks(), 0
    sweep(function()
      local f = ex:submit(function(p) return p.x end, arg)
      returned = returned + 1 -- the interrupt may come after submit
      return f
    end, function()
      assert.are.equal(before + returned, tasks())
    end)
    assert.are.equal(5, ex:submit(function(p) return p.x end, arg):result(10))
  end)

  it("while map's results are decoded: raised; the pool works after", function()
    sweep(function()
      local out = {}
      for _, v in ex:map(function(i) return { i } end, { 1, 2, 3, 4 }) do out[#out + 1] = v[1] end
      return out
    end)
    local out = {}
    for _, v in ex:map(function(i) return i * 2 end, { 1, 2, 3 }) do out[#out + 1] = v end
    assert.are.same({ 2, 4, 6 }, out)
  end)

  it("while the CLI's pipeline takes results: raised, not an item's failure", function()
    local pipeline = require("procpool.map").pipeline
    local function run()
      local pipe = pipeline(ex, function(i) return { i } end, {})
      local k = 0
      local function input()
        k = k + 1
        if k <= 6 then return true, k end
      end
      assert(select(2, pipe.fill(input)) == "ended")
      local got, t0 = {}, core.monotonic()
      while #got < 6 and core.monotonic() - t0 < 10 do
        local base, n, values, failures = pipe.take()
        if base then
          for j = 1, n do
            assert(not (failures and failures[j]), failures and failures[j] and failures[j][1])
            got[base + j] = values[j][1]
          end
        else
          procpool.wait({ ex:submit(function() end) }, { timeout = 1 })
        end
      end
      return got
    end
    sweep(run)
    assert.are.same({ 1, 2, 3, 4, 5, 6 }, run())
  end)

  it("from map's input: raised at once, not after the items before it", function()
    local t0 = core.monotonic()
    local n = 0
    local ok, e = pcall(function()
      local function input()
        n = n + 1
        if n == 3 then error("interrupted!") end
        if n < 3 then return n end
      end
      for _ in ex:map(function(i) require("procpool.core").sleep(2) return i end, input) do end
    end)
    assert.is_false(ok)
    assert.is_true(core.is_interrupt(e), tostring(e))
    assert.is_true(core.monotonic() - t0 < 1.5, "took " .. core.monotonic() - t0 .. " s")
  end)

  it("in a done callback: raised from the wait, after the other callbacks ran", function()
    local ran = {}
    local f = ex:submit(function() return 7 end)
    f:add_done_callback(function() ran[#ran + 1] = "a" error("interrupted!") end)
    f:add_done_callback(function() ran[#ran + 1] = "b" end)
    local g = ex:submit(function() return 8 end)
    g:add_done_callback(function() ran[#ran + 1] = "g" end)
    local ok, e = pcall(function()
      settle(f, g)
      ex:submit(function() end):result(10) -- a drain at the latest here
    end)
    assert.is_false(ok)
    assert.is_true(core.is_interrupt(e), tostring(e))
    ex:submit(function() end):result(10) -- any callback left runs by now
    table.sort(ran)
    assert.are.same({ "a", "b", "g" }, ran)
    assert.are.equal(7, f:result())
    -- on a done future the callback runs in add_done_callback: raised there
    local ok2, e2 = pcall(f.add_done_callback, f, function() error("interrupted!") end)
    assert.is_false(ok2)
    assert.is_true(core.is_interrupt(e2), tostring(e2))
  end)

  it("in a progress callback: raised from the wait, after the other callbacks ran", function()
    local seen = {}
    local f = ex:submit(function()
      local report = require("procpool").report
      report(1)
      report(2)
      return "done"
    end)
    f:add_progress_callback(function(_, v)
      seen[#seen + 1] = v
      if v == 1 then error("interrupted!") end
    end)
    local ok, e = pcall(function()
      local t0 = core.monotonic()
      while #seen < 2 and core.monotonic() - t0 < 10 do procpool.wait({ f }, { timeout = 0.05 }) end
    end)
    assert.is_false(ok)
    assert.is_true(core.is_interrupt(e), tostring(e))
    local t0 = core.monotonic()
    while #seen < 2 and core.monotonic() - t0 < 10 do procpool.wait({ f }, { timeout = 0.05 }) end
    assert.are.same({ 1, 2 }, seen)
    assert.are.equal("done", f:result(10))
  end)
end)
