-- procpool.Pool and AsyncResult, ported from CPython's
-- _test_multiprocessing Pool tests where they apply.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 10

local range = H.range

local function squares(n)
  local t = { n = n }
  for i = 1, n do t[i] = i * i end
  return t
end

describe("Pool", function()
  local pool
  before_each(function() pool = procpool.Pool { processes = 2 } end)
  after_each(function()
    pool:terminate()
    pool:join()
    collectgarbage()
    collectgarbage()
  end)

  describe("apply", function()
    it("returns fn's values (test_apply)", function()
      assert.are.equal(25, pool:apply("spec.tasks.square", { 5 }))
      local a, b = pool:apply(function(x, y) return y, x end, { 1, 2 })
      assert.are.same({ 2, 1 }, { a, b })
      assert.are.equal(0, select("#", pool:apply(function() end)))
    end)

    it("raises the task's error", function()
      local ok, e = pcall(pool.apply, pool, "spec.tasks.fail", { "bad" })
      assert.is_false(ok)
      assert.are.equal("bad", e)
    end)

    it("apply_async: get, ready, successful, wait (test_async)", function()
      local r = pool:apply_async("spec.tasks.sleep", { 0.2, "v" })
      assert.is_false(r:ready())
      local ok, e = pcall(r.successful, r)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "InvalidStateError"))
      assert.is_true(r:wait(T))
      assert.is_true(r:ready())
      assert.is_true(r:successful())
      assert.are.equal("v", r:get(0))
      local rf = pool:apply_async("spec.tasks.fail", { "x" })
      rf:wait(T)
      assert.is_false(rf:successful())
    end)

    it("get(timeout) raises TimeoutError and can be called again (test_async_timeout)", function()
      local r = pool:apply_async("spec.tasks.sleep", { 0.5, "late" })
      local t0 = core.monotonic()
      local ok, e = pcall(r.get, r, 0.1)
      local waited = core.monotonic() - t0
      assert.is_false(ok)
      assert.are.equal("TimeoutError", e.name)
      assert.is_true(waited >= 0.09 and waited < 0.4)
      assert.is_false(r:wait(0.05))
      assert.are.equal("late", r:get(T))
    end)

    it("runs callback / error_callback in the parent (test_async_error_callback)", function()
      local got, err
      local r = pool:apply_async("spec.tasks.add", { 2, 3 },
        { callback = function(v) got = { v, H.pid(), procpool.current_worker() } end })
      r:get(T)
      assert.are.same({ 5, H.pid() }, got)
      local r2 = pool:apply_async("spec.tasks.fail", { "KeyError" },
        { error_callback = function(e) err = e end })
      r2:wait(T)
      assert.are.equal("KeyError", err)
    end)

    it("apply_async: values decoded once: every get and the callback see the same", function()
      local seen
      local r = pool:apply_async(function() return { 1 }, nil, "c" end, nil,
        { callback = function(...) seen = table.pack(...) end })
      local a, b, c = r:get(T)
      assert.are.same({ 1 }, a)
      assert.is_nil(b)
      assert.are.equal("c", c)
      assert.are.equal(3, select("#", r:get(T)))
      assert.are.equal(a, (r:get(T))) -- the same table, not a second decode
      assert.are.equal(3, seen.n)
      assert.are.equal(a, seen[1])
      assert.are.equal(0, select("#", pool:apply_async(function() end):get(T)))
      local one = pool:apply_async(function() return {} end)
      assert.is_true(one:wait(T))
      assert.is_true(one:successful())
      assert.are.equal(one:get(T), one:get(T))
      local rf = pool:apply_async("spec.tasks.fail", { "x" })
      for _ = 1, 2 do
        local ok, e = pcall(rf.get, rf, T)
        assert.is_false(ok)
        assert.are.equal("x", e)
      end
      assert.is_false(rf:successful())
    end)

    -- apply_async without options is answered in C (core.fast_apply) and
    -- its result is the task's Future under AsyncResult's metatable; the
    -- Lua method takes every other shape: both must mean the same
    it("apply_async: every shape of arguments, fast or not, gives the same call", function()
      local count = function(...) return select("#", ...), ... end
      local function check(args, n, ...)
        local expect = table.pack(n, ...)
        for _, opts in ipairs({ false, { timeout = T }, { callback = function() end } }) do
          local r = opts and pool:apply_async(count, args, opts) or pool:apply_async(count, args)
          assert.are.same(expect, table.pack(r:get(T)))
        end
      end
      check(nil, 0)
      check({}, 0)
      check({ 1, 2, 3 }, 3, 1, 2, 3)
      check({ n = 3, 1, nil, 3 }, 3, 1, nil, 3)
      local tens = { __len = function() return 2 end }
      tens.__index = function(_, k) return math.type(k) and k * 10 or nil end
      check(setmetatable({}, tens), 2, 10, 20)
      local many = {}
      for i = 1, 100 do many[i] = i end
      check(many, 100, table.unpack(many))
      assert.are.equal(16, pool:apply_async("spec.tasks.square", { 4 }):get(T))
    end)

    it("apply_async: an option-less result is an AsyncResult, with its methods only", function()
      local r = pool:apply_async(function() return 1 end)
      assert.matches("^procpool%.AsyncResult: ", tostring(r))
      assert.are.equal(1, r:get(T))
      assert.matches("^procpool%.AsyncResult: .*%(finished%)$", tostring(r))
      for _, m in ipairs({ "get", "wait", "ready", "successful", "progress", "add_progress_callback" }) do
        assert.are.equal("function", type(r[m]), m)
      end
      -- a Future's own methods stay the Future's
      assert.is_nil(r.result)
      assert.is_nil(r.cancel)
      assert.are_not.equal(core.Future, getmetatable(r))
      local cb = pool:apply_async(function() return 1 end, nil, { callback = function() end })
      assert.matches("^procpool%.AsyncResult: ", tostring(cb))
      assert.is_nil(cb.result)
    end)

    it("apply_async: errors name the problem, and the pool goes on", function()
      local ok, e = pcall(pool.apply_async, pool, 42)
      assert.is_false(ok)
      assert.matches("bad argument #1 to 'apply_async'", e)
      ok, e = pcall(pool.apply_async, pool, "spec.tasks.square", 3)
      assert.is_false(ok)
      assert.matches("table of arguments expected, got number", e)
      ok, e = pcall(pool.apply_async, pool, "spec.tasks.square", { io.stdout })
      assert.is_false(ok)
      assert.matches("cannot", e)
      assert.are.equal(9, pool:apply_async("spec.tasks.square", { 3 }):get(T))
      pool:close()
      ok, e = pcall(pool.apply_async, pool, "spec.tasks.square", { 3 })
      assert.is_false(ok)
      assert.are.equal("InvalidStateError", e.name)
    end)
  end)

  describe("map", function()
    it("returns a list with n, in order (test_map)", function()
      assert.are.same(squares(10), pool:map("spec.tasks.square", range(10)))
      assert.are.same(squares(100), pool:map("spec.tasks.square", range(100), 20))
      assert.are.same(squares(100), pool:map("spec.tasks.square", range(100), 1000))
    end)

    it("gives the chunks queued behind a long item to the idle worker", function()
      -- tiny tasks first, so the engine expects tiny items and deep windows
      local rs = {}
      for i = 1, 2000 do rs[i] = pool:apply_async("spec.tasks.square", { i }) end
      for i = 1, 2000 do rs[i]:get(T) end
      local items = { 0.5 }
      for i = 2, 40 do items[i] = 0.002 end
      local ids = pool:map("spec.tasks.sleep_id", items, 5) -- 8 chunks, sent in a burst
      local on_long = 0
      for i = 1, 40 do if ids[i] == ids[1] then on_long = on_long + 1 end end
      -- its own chunk and at most one more: the other 6 chunks ran elsewhere
      assert.is_true(on_long <= 10, on_long .. " items ran on the long item's worker")
    end)

    it("gives its chunks' memory back as it returns, not at the next collection", function()
      -- in a fresh process with the collector stopped: a chunk's item
      -- records (16 bytes an item) and result frames go back to the cache
      -- of warm buffers as soon as the map, or an iterator, has taken
      -- them; before, they waited for the collector and the next map ran
      -- on pages the kernel had to find and zero
      local function kept_after(call)
        local ok, out, err = H.run_lua([[
          package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
          local procpool = require "procpool"
          local core = require "procpool.core"
          local pool = procpool.Pool { processes = 2 }
          local items = {}
          for i = 1, 100000 do items[i] = i end
          local function id(x) return x end
          collectgarbage("stop")
          local before = core._warm_kept()
          local sum = 0
          ]] .. call .. [[
          assert(sum == 100000 * 100001 // 2, "every item came back")
          io.write(before, " ", core._warm_kept())
          pool:close()
          pool:join()
        ]], 60)
        assert.is_true(ok, err)
        local before, after = out:match("^(%d+) (%d+)$")
        assert.are.equal("0", before, out)
        return tonumber(after)
      end
      -- all 4 chunks of 25 000 items at once: their records at least
      local kept = kept_after([[
        local r = pool:map(id, items, 25000)
        for i = 1, r.n do sum = sum + r[i] end]])
      assert.is_true(kept >= 4 * 25000 * 16, kept)
      -- 8 chunks of 10 000 in flight (buffersize 4 x workers x chunksize)
      kept = kept_after([[
        for _, v in pool:imap_unordered(id, items, 10000) do sum = sum + v end]])
      assert.is_true(kept >= 8 * 10000 * 16, kept)
    end)

    it("keeps holes for nil results", function()
      local r = pool:map(function(x) if x % 2 == 1 then return x end end, range(5))
      assert.are.equal(5, r.n)
      assert.are.same({ 1, nil, 3, nil, 5 }, { r[1], r[2], r[3], r[4], r[5] })
    end)

    it("moves every scalar item and result exactly, whatever its width", function()
      local items = {
        0, 1, -1, 127, 128, -128, -129, 255, 256, 32767, 32768, -32768, -32769,
        65535, 65536, 2147483647, 2147483648, -2147483648, -2147483649,
        math.maxinteger, math.mininteger, 3.0, -0.0, 0.5, 1e300, math.huge,
        -math.huge, true, false, "", "s", string.rep("x", 300),
      }
      local function same(r)
        assert.are.equal(#items, r.n)
        for i, v in ipairs(items) do
          assert.are.equal(math.type(v), math.type(r[i]), "item " .. i)
          assert.are.equal(v, r[i], "item " .. i)
        end
        assert.are.equal("-0.0", string.format("%.1f", r[23])) -- items[23] is -0.0
      end
      local id = function(x) return x end
      same(pool:map(id, items))
      same(pool:map(id, items, 5))
      local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2 }
      local r = { n = #items }
      for i, v in ex:map(id, items, { chunksize = 3, timeout = T }) do r[i] = v end
      same(r)
      local nan = pool:map(id, { 0 / 0 })[1]
      assert.is_true(nan ~= nan)
    end)

    it("maps over an iterator function", function()
      local i = 0
      local r = pool:map("spec.tasks.square", function()
        i = i + 1
        if i <= 4 then return i end
      end)
      assert.are.same(squares(4), r)
    end)

    it("uses CPython's default chunksize, ceil(#list / (4 * processes))", function()
      assert.are.equal(8, #pool:map_async("spec.tasks.square", range(100))._futs) -- chunks of 13
      assert.are.equal(7, #pool:map_async("spec.tasks.square", range(7))._futs) -- chunks of 1
      assert.are.equal(3, #pool:map_async("spec.tasks.square", range(10), { chunksize = 4 })._futs)
    end)

    it("gives {n = 0} for an empty list (test_empty_iterable)", function()
      assert.are.same({ n = 0 }, pool:map("spec.tasks.square", {}))
      assert.are.same({ n = 0 }, pool:starmap("spec.tasks.add", {}))
      local called
      local r = pool:map_async("spec.tasks.square", {}, { callback = function(l) called = l end })
      assert.is_true(r:ready())
      assert.are.same({ n = 0 }, r:get(0))
      assert.are.same({ n = 0 }, called)
      local n = 0
      for _ in pool:imap("spec.tasks.square", {}) do n = n + 1 end
      for _ in pool:imap_unordered("spec.tasks.square", {}) do n = n + 1 end
      assert.are.equal(0, n)
    end)

    it("raises the first task error, after all chunks finished (test_map_no_failfast)", function()
      local t0 = core.monotonic()
      local ok, e = pcall(pool.map, pool, function(x)
        if x == 1 then error("first") end
        require("procpool.core").sleep(0.05)
        return x
      end, range(8), 1)
      assert.is_false(ok)
      assert.matches("first", e)
      assert.is_true(core.monotonic() - t0 >= 0.15) -- the other chunks ran
      pool:close()
      pool:join()
    end)

    it("map_async calls callback once with the list (test_map_async_callbacks)", function()
      local calls, errs = {}, {}
      local r = pool:map_async("spec.tasks.square", { 1, 2, 3 }, {
        callback = function(l) calls[#calls + 1] = l end,
        error_callback = function(e) errs[#errs + 1] = e end,
      })
      assert.are.same(squares(3), r:get(T))
      assert.are.equal(1, #calls)
      assert.are.same(squares(3), calls[1])
      assert.are.equal(0, #errs)
      local r2 = pool:map_async(function(x) return x + 0 end, { 1, "a" }, {
        callback = function(l) calls[#calls + 1] = l end,
        error_callback = function(e) errs[#errs + 1] = e end,
      })
      r2:wait(T)
      assert.are.equal(1, #errs)
      assert.are.equal(1, #calls)
    end)

    it("survives a raising callback (no dead result handler, gh-83371)", function()
      local ok, out, err = H.run_lua([[
        package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
        package.cpath = "]] .. (os.getenv("PROCPOOL_BUILD") or "build") .. [[/?.so;" .. package.cpath
        local procpool = require "procpool"
        local pool = procpool.Pool { processes = 1 }
        local r = pool:apply_async("spec.tasks.add", { 1, 2 }, { callback = function() error("cb boom") end })
        io.write(r:get(10), " ")
        local r2 = pool:map_async("spec.tasks.square", { 3 }, { error_callback = function() error("never") end })
        io.write(r2:get(10)[1], " ")
        io.write(pool:apply("spec.tasks.add", { 2, 2 }))
        pool:close()
        pool:join()
      ]])
      assert.is_true(ok)
      assert.are.equal("3 9 4", out)
      assert.matches("cb boom", err)
    end)

    it("starmap unpacks items with table.unpack(item, 1, item.n or #item) (test_starmap)", function()
      assert.are.same({ n = 3, 3, 7, 11 }, pool:starmap("spec.tasks.add", { { 1, 2 }, { 3, 4 }, { 5, 6 } }))
      local r = pool:starmap(function(...) return select("#", ...) end, { { 1, nil, n = 3 }, {} })
      assert.are.same({ n = 2, 3, 0 }, r)
      assert.are.same({ n = 2, 3, 7 }, pool:starmap_async("spec.tasks.add", { { 1, 2 }, { 3, 4 } }):get(T))
    end)

    it("reports an unserializable result and loses no worker (test_unpickleable_result)", function()
      for _ = 1, 20 do
        local ok, e = pcall(pool.apply, pool, function() return coroutine.create(print) end)
        assert.is_false(ok)
        assert.is_true(procpool.is_error(e, "SerializationError"))
      end
      local err
      pool:map_async(function() return io.stdout end, { 1 }, { error_callback = function(e) err = e end }):wait(T)
      assert.is_true(procpool.is_error(err, "SerializationError"))
      assert.are.equal(0, pool._ex:stats().worker_restarts)
    end)

    it("moves 32 MiB arguments and results each way", function()
      local big = ("0123456789abcdef"):rep(2 * 1024 * 1024)
      local r = pool:apply(function(s) return s:upper(), #s end, { big })
      assert.are.equal(#big, #r)
      assert.are.equal(big:upper(), r)
      local l = pool:map(function(s) return s:reverse() end, { big, "ab" })
      assert.are.equal(big:reverse(), l[1])
      assert.are.equal("ba", l[2])
    end)
  end)

  describe("imap", function()
    it("yields i, v in input order, lazily (test_imap)", function()
      local out = {}
      for i, v in pool:imap("spec.tasks.square", range(10)) do out[i] = v end
      assert.are.same(squares(10), setmetatable(out, nil).n and out or (function() out.n = 10 return out end)())
      local n = 0
      for i, v in pool:imap("spec.tasks.square", range(1000), 100) do
        n = n + 1
        assert.are.equal(i * i, v)
      end
      assert.are.equal(1000, n)
    end)

    it("consumes an endless iterator lazily", function()
      local pulled = 0
      for i in pool:imap("spec.tasks.square", function() pulled = pulled + 1 return pulled end) do
        if i == 10 then break end
      end
      assert.is_true(pulled < 100, "pulled " .. pulled)
    end)

    it("raises a task error at its position and can go on (PL-10)", function()
      local iter = pool:imap(function(x) if x % 3 == 0 then error("bad " .. x, 0) end return x end,
        range(5))
      local got = {}
      for _ = 1, 7 do
        local ok, i, v = pcall(iter)
        got[#got + 1] = ok and (i and v or "end") or i
      end
      assert.are.same({ 1, 2, "bad 3", 4, 5, "end", "end" }, got)
    end)

    it("yields what came before an input that raises (test_imap_handle_iterable_exception)", function()
      local k = 0
      local function input()
        k = k + 1
        if k == 7 then error("input broke", 0) end
        return k
      end
      local got = {}
      local ok, e = pcall(function()
        for i, v in pool:imap("spec.tasks.square", input, 2) do got[i] = v end
      end)
      assert.is_false(ok)
      assert.are.equal("input broke", e)
      assert.are.equal(6, #got)
    end)

    it("imap_unordered yields completion order with input indices (test_imap_unordered)", function()
      local order, seen = {}, {}
      for i, v in pool:imap_unordered(function(d) require("procpool.core").sleep(d) return d end,
        { 0.4, 0.05, 0.2 }) do
        order[#order + 1] = i
        seen[i] = v
      end
      assert.are.same({ 0.4, 0.05, 0.2 }, seen)
      assert.are.equal(2, order[1])
      local all = {}
      for i, v in pool:imap_unordered("spec.tasks.square", range(100), 7) do all[i] = v end
      for i = 1, 100 do assert.are.equal(i * i, all[i]) end
    end)
  end)

  describe("lifecycle", function()
    it("close then join finishes queued work and leaves no workers", function()
      local r = pool:map_async("spec.tasks.sleep", { 0.1, 0.1, 0.1, 0.1 })
      pool:close()
      pool:join()
      assert.is_true(r:ready())
      assert.are.equal(4, r:get(0).n)
      assert.are.equal(0, #H.children())
    end)

    it("refuses new work after close, and join before close", function()
      local ok, e = pcall(pool.join, pool)
      assert.is_false(ok)
      assert.are.equal("Pool is still running", e.message)
      pool:close()
      for _, call in ipairs({
        function() return pool:apply("spec.tasks.add", { 1, 2 }) end,
        function() return pool:map("spec.tasks.square", { 1 }) end,
        function() return pool:imap("spec.tasks.square", { 1 }) end,
      }) do
        local okc, ec = pcall(call)
        assert.is_false(okc)
        assert.are.equal("Pool not running", ec.message)
      end
    end)

    it("terminate stops at once and join returns promptly (test_terminate)", function()
      local r = pool:map_async("spec.tasks.sleep", (function()
        local t = {}
        for i = 1, 10000 do t[i] = 1 end
        return t
      end)(), { chunksize = 1 })
      core.sleep(0.1)
      local t0 = core.monotonic()
      pool:terminate()
      pool:join()
      assert.is_true(core.monotonic() - t0 < 2.5)
      local ok, e = pcall(r.get, r, T)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "BrokenProcessPool"))
      assert.are.equal(0, #H.children())
    end)

    it("<close> is close() then join()", function()
      local r
      local before = #H.children()
      do
        local p <close> = procpool.Pool { processes = 1 }
        r = p:apply_async("spec.tasks.sleep", { 0.1, "done" })
      end
      assert.is_true(r:ready())
      assert.are.equal("done", r:get(0))
      assert.are.equal(before, #H.children())
    end)

    it("recycles workers with maxtasksperchild, per task (test_pool_worker_lifetime)", function()
      local p = procpool.Pool { processes = 2, maxtasksperchild = 10 }
      local pids = {}
      for _, pid in ipairs(p:map("spec.tasks.pid", range(100), 1)) do pids[pid] = true end
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      assert.is_true(n >= 10, n .. " pids")
      local q = procpool.Pool { processes = 1, maxtasksperchild = 2 }
      local seen, m = {}, 0
      for _, pid in ipairs(q:map("spec.tasks.pid", range(10), 5)) do
        if not seen[pid] then
          seen[pid] = true
          m = m + 1
        end
      end
      assert.are.equal(5, m)
      p:close()
      p:join()
      q:close()
      q:join()
    end)

    it("closes cleanly with maxtasksperchild = 1 (test_pool_worker_lifetime_early_close)", function()
      local p = procpool.Pool { processes = 1, maxtasksperchild = 1 }
      local rs = {}
      for i = 1, 6 do rs[i] = p:apply_async("spec.tasks.sleep", { 0.01, i }) end
      p:close()
      p:join()
      for i = 1, 6 do assert.are.equal(i, rs[i]:get(0)) end
    end)

    it("breaks instead of respawning forever when the initializer fails", function()
      local p = procpool.Pool { processes = 2, initializer = function() error("no init") end }
      local ok, e = pcall(p.apply, p, "spec.tasks.add", { 1, 2 })
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "BrokenProcessPool"))
      assert.matches("no init", e.message)
      p:terminate()
      p:join()
    end)

    it("runs the initializer in each worker", function()
      local p = procpool.Pool { processes = 2, initializer = "spec.tasks.init", initargs = { "hi" } }
      for _, v in ipairs(p:map("spec.tasks.get_init", range(6), 1)) do assert.are.equal("hi", v) end
      p:close()
      p:join()
    end)
  end)

  describe("with bad arguments", function()
    it("rejects bad pool options (test_make_pool, test_pool_maxtasksperchild_invalid)", function()
      for _, n in ipairs({ 0, -1 }) do
        local ok, e = pcall(procpool.Pool, { processes = n })
        assert.is_false(ok)
        assert.matches("Number of processes must be at least 1", e)
      end
      for _, m in ipairs({ 0, -1, 0.5, "12" }) do
        local ok, e = pcall(procpool.Pool, { maxtasksperchild = m })
        assert.is_false(ok)
        assert.matches("maxtasksperchild must be a positive integer or nil", e)
      end
      assert.has_error(function() procpool.Pool { procs = 2 } end)
      assert.has_error(function() procpool.Pool { initializer = 1 } end)
    end)

    it("rejects bad call arguments", function()
      assert.has_error(function() pool:apply(42, {}) end)
      assert.has_error(function() pool:apply("spec.tasks.add", 3) end)
      assert.has_error(function() pool:map("spec.tasks.square", { 1 }, 0) end, "chunksize must be >= 1")
      assert.has_error(function() pool:imap("spec.tasks.square", { 1 }, -1) end, "chunksize must be >= 1")
      assert.has_error(function() pool:map_async("spec.tasks.square", { 1 }, { callback = 1 }) end)
      assert.has_error(function() pool:apply_async("spec.tasks.add", {}, { nope = true }) end)
    end)
  end)
end)
