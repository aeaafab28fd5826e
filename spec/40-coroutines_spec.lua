-- Waits inside coroutines: the waiter protocol, cqueues and luv.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 10

-- A tiny scheduler: coroutines yield from the waiter; run() resumes them
-- round-robin until all are dead.
local function scheduler()
  local S = { cos = {}, waits = 0 }
  function S.spawn(fn) S.cos[#S.cos + 1] = coroutine.create(fn) end
  function S.waiter()
    S.waits = S.waits + 1
    coroutine.yield()
  end
  function S.run(limit)
    local t0 = core.monotonic()
    repeat
      local alive = false
      for _, co in ipairs(S.cos) do
        if coroutine.status(co) == "suspended" then
          alive = true
          local ok, err = coroutine.resume(co)
          if not ok then error(err, 0) end
        end
      end
      core.sleep(0.001)
    until not alive or core.monotonic() - t0 > (limit or T)
  end
  return S
end

describe("coroutines", function()
  local ex
  before_each(function() ex = procpool.ProcessPoolExecutor { max_workers = 2 } end)
  after_each(function()
    procpool.set_waiter(nil)
    ex:shutdown { cancel_futures = true }
    collectgarbage()
  end)

  it("yield through the waiter in every blocking call (no C-call boundary errors)", function()
    local S = scheduler()
    procpool.set_waiter(S.waiter)
    local pool = procpool.Pool { processes = 1 }
    local out = {}
    S.spawn(function()
      local f = ex:submit("spec.tasks.sleep", 0.05, "r")
      out.result = f:result(T)
      out.exception = ex:submit("spec.tasks.fail", "e"):exception(T)
      local done = procpool.wait({ ex:submit("spec.tasks.sleep", 0.05, 1) }, { timeout = T })
      out.wait = #done
      local n = 0
      for g in procpool.as_completed({ ex:submit("spec.tasks.add", 1, 1) }, T) do n = n + g:result(0) end
      out.as_completed = n
      local s = 0
      for _, v in ex:map("spec.tasks.square", { 1, 2, 3 }, { timeout = T }) do s = s + v end
      out.map = s
      out.get = pool:apply_async("spec.tasks.sleep", { 0.05, "g" }):get(T)
      s = 0
      for _, v in pool:imap("spec.tasks.square", { 1, 2 }) do s = s + v end
      out.imap = s
      pool:close()
      pool:join()
      out.join = true
    end)
    S.run()
    assert.are.same({ result = "r", exception = "e", wait = 1, as_completed = 2, map = 14,
      get = "g", imap = 5, join = true }, out)
    assert.is_true(S.waits > 0)
  end)

  it("lets other coroutines run while one waits", function()
    local S = scheduler()
    procpool.set_waiter(S.waiter)
    local ticks, got = 0, nil
    S.spawn(function() got = ex:submit("spec.tasks.sleep", 0.3, "slow"):result(T) end)
    S.spawn(function()
      while not got do
        ticks = ticks + 1
        coroutine.yield()
      end
    end)
    S.run()
    assert.are.equal("slow", got)
    assert.is_true(ticks > 20, "ticks " .. ticks)
  end)

  it("keeps a timeout a deadline, however often the waiter returns", function()
    local S = scheduler()
    procpool.set_waiter(S.waiter)
    local err, took
    S.spawn(function()
      local t0 = core.monotonic()
      local ok, e = pcall(function() return ex:submit("spec.tasks.sleep", 2):result(0.25) end)
      took = core.monotonic() - t0
      err = not ok and e
    end)
    S.run()
    assert.are.equal("TimeoutError", err.name)
    assert.is_true(took >= 0.24 and took < 0.6, "took " .. took)
    assert.is_true(S.waits > 10) -- woken many times, the deadline held
  end)

  it("blocks instead where it cannot yield: main thread, or no waiter", function()
    local S = scheduler()
    procpool.set_waiter(S.waiter)
    assert.are.equal(3, ex:submit("spec.tasks.add", 1, 2):result(T)) -- main thread
    procpool.set_waiter(nil)
    local v
    local co = coroutine.wrap(function() v = ex:submit("spec.tasks.add", 2, 2):result(T) end)
    co()
    assert.are.equal(4, v)
    assert.are.equal(0, S.waits)
  end)

  it("rejects a waiter that is not a function", function()
    assert.has_error(function() procpool.set_waiter(42) end)
  end)

  describe("cqueues", function()
    local cqueues = require "cqueues"

    after_each(function() package.loaded["procpool.cqueues"] = nil end)

    it("awaits two futures concurrently in one controller while a third runs a timer", function()
      require "procpool.cqueues"
      local cq = cqueues.new()
      local got, ticks = {}, 0
      cq:wrap(function() local v = ex:submit("spec.tasks.sleep", 0.4, "a"):result(T) got.a = v end)
      cq:wrap(function() local v = ex:submit("spec.tasks.sleep", 0.4, "b"):result(T) got.b = v end)
      cq:wrap(function()
        for _ = 1, 10 do
          cqueues.sleep(0.03)
          ticks = ticks + 1
        end
      end)
      local t0 = core.monotonic()
      assert(cq:loop(T))
      local took = core.monotonic() - t0
      assert.are.same({ a = "a", b = "b" }, got)
      assert.are.equal(10, ticks)
      assert.is_true(took < 0.75, "took " .. took) -- concurrent, not 0.8 s
    end)

    it("treats futures and executors as pollables", function()
      local cq = cqueues.new()
      local out = {}
      cq:wrap(function()
        local f = ex:submit("spec.tasks.sleep", 0.1, "polled")
        assert(cqueues.poll(f) == f)
        out.f = f:result(0)
        ex:poll() -- counts completions since the previous poll: start afresh
        local g = ex:submit("spec.tasks.add", 1, 1)
        local n = 0
        while n == 0 do
          cqueues.poll(ex)
          n = n + ex:poll()
        end
        out.n = n
        out.g = g:result(0)
      end)
      assert(cq:loop(T))
      assert.are.same({ f = "polled", n = 1, g = 2 }, out)
    end)

    it("survives many short waits in a row (fd numbers reused)", function()
      require "procpool.cqueues"
      local cq = cqueues.new()
      local sums = { 0, 0 }
      for k = 1, 2 do
        cq:wrap(function()
          for i = 1, 300 do
            local v = ex:submit("spec.tasks.add", i, 0):result(T)
            sums[k] = sums[k] + v
          end
        end)
      end
      assert(cq:loop(T))
      assert.are.same({ 45150, 45150 }, sums)
    end)
  end)

  describe("luv", function()
    local uv = require "luv"

    after_each(function() package.loaded["procpool.luv"] = nil end)

    it("awaits futures in coroutines while uv.run() drives timers", function()
      require "procpool.luv"
      local got, ticks = {}, 0
      for _, name in ipairs({ "a", "b" }) do
        assert(coroutine.resume(coroutine.create(function()
          local v = ex:submit("spec.tasks.sleep", 0.3, name):result(T)
          got[name] = v
        end)))
      end
      assert(coroutine.resume(coroutine.create(function()
        local ok, e = pcall(function() return ex:submit("spec.tasks.sleep", 2):result(0.1) end)
        got.timeout = not ok and e.name
      end)))
      local timer = uv.new_timer()
      timer:start(20, 20, function()
        ticks = ticks + 1
        if got.a and got.b and got.timeout then
          timer:stop()
          timer:close()
        end
      end)
      local t0 = core.monotonic()
      uv.run()
      assert.are.same({ a = "a", b = "b", timeout = "TimeoutError" }, got)
      assert.is_true(ticks >= 10, "ticks " .. ticks)
      assert.is_true(core.monotonic() - t0 < 0.7)
    end)
  end)

  describe("examples", function()
    local build = os.getenv("PROCPOOL_BUILD") or "build"
    local prelude = "package.path = 'lua/?.lua;lua/?/init.lua;./?.lua;' .. package.path\n"
      .. "package.cpath = '" .. build .. "/?.so;' .. package.cpath\n"
    local function run_example(path)
      local f = assert(io.open(path))
      local code = f:read("a")
      f:close()
      return H.run_lua(prelude .. code, 60)
    end

    it("examples/cqueues_server.lua answers pings while the pool works", function()
      local ok, out, err = run_example("examples/cqueues_server.lua")
      assert.is_true(ok, err)
      assert.matches("primes below 1 200 000: 92938", out)
      local pings = tonumber(out:match("meanwhile (%d+) pings"))
      assert.is_true(pings >= 5, out)
    end)

    it("examples/luv_timers.lua ticks while the pool works", function()
      local ok, out, err = run_example("examples/luv_timers.lua")
      assert.is_true(ok, err)
      assert.matches("fib%(29%) = 514229, fib%(30%) = 832040", out)
      assert.is_true(tonumber(out:match("ticked (%d+) times")) >= 2, out)
    end)
  end)
end)
