-- Executor:map / starmap: order, laziness, errors, timeouts, chunking.
local procpool = require "procpool"
local core = require "procpool.core"

local T = 10

local function collect(iter, s, c, closer)
  local out = { n = 0 }
  for i, v in iter, s, c, closer do
    out.n = out.n + 1
    assert.are.equal(out.n, i)
    out[i] = v
  end
  return out
end

describe("Executor:map", function()
  local ex
  before_each(function() ex = procpool.ProcessPoolExecutor { max_workers = 2 } end)
  after_each(function()
    ex:shutdown { cancel_futures = true }
    collectgarbage()
  end)

  it("yields i, v in input order whatever the completion order", function()
    local delays = { 0.3, 0.1, 0.2, 0.0, 0.05 }
    local out = collect(ex:map(function(d) require("procpool.core").sleep(d) return d end, delays,
      { timeout = T }))
    assert.are.same({ n = 5, 0.3, 0.1, 0.2, 0.0, 0.05 }, out)
  end)

  it("includes nil results and nil items", function()
    local out = collect(ex:map(function(x) if x ~= 2 then return x end end,
      { 1, 2, nil, 4, n = 4 }, { timeout = T }))
    assert.are.equal(4, out.n)
    assert.are.same({ 1, nil, nil, 4 }, { out[1], out[2], out[3], out[4] })
  end)

  it("maps over iterator functions, like io.lines", function()
    local path = os.tmpname()
    local f = io.open(path, "w")
    f:write("a\nbb\nccc\n")
    f:close()
    local out = collect(ex:map(string.len, io.lines(path), { timeout = T }))
    os.remove(path)
    assert.are.same({ n = 3, 1, 2, 3 }, out)
  end)

  it("consumes an endless input only buffersize ahead", function()
    local pulled = 0
    local function naturals()
      pulled = pulled + 1
      return pulled
    end
    local got = {}
    for i, v in ex:map("spec.tasks.square", naturals, { chunksize = 1, buffersize = 3, timeout = T }) do
      got[i] = v
      if i == 5 then break end
    end
    assert.are.same({ 1, 4, 9, 16, 25 }, got)
    assert.is_true(pulled <= 5 + 3, "pulled " .. pulled)
  end)

  it("takes buffersize items before yielding (test_map_buffersize_when_buffer_is_full)", function()
    local pulled = 0
    local function gen()
      if pulled >= 4 then return nil end
      pulled = pulled + 1
      return pulled - 1
    end
    local iter = ex:map("spec.tasks.square", gen, { chunksize = 1, buffersize = 2, timeout = T })
    assert.are.equal(0, pulled) -- lazy: nothing before the first step
    local i, v = iter()
    assert.are.same({ 1, 0 }, { i, v })
    assert.are.equal(2, pulled)
  end)

  it("raises the first task error when iteration reaches it, then stops", function()
    local seen = {}
    local ok, e = pcall(function()
      for i, v in ex:map(function(x) if x == 3 then error("bad " .. x, 0) end return x end,
        { 1, 2, 3, 4, 5 }, { chunksize = 1, timeout = T }) do
        seen[i] = v
      end
    end)
    assert.is_false(ok)
    assert.are.equal("bad 3", e)
    assert.are.same({ 1, 2 }, seen)
  end)

  it("cancels the rest of its work after an error", function()
    local ex1 = procpool.ProcessPoolExecutor { max_workers = 1 }
    local items = {}
    for i = 1, 50 do items[i] = i end
    local ok = pcall(function()
      for _ in ex1:map(function(x)
        require("procpool.core").sleep(0.01)
        if x == 1 then error("first") end
        return x
      end, items, { chunksize = 1, buffersize = 40, timeout = T }) do end
    end)
    assert.is_false(ok)
    ex1:shutdown()
    local st = ex1:stats()
    assert.is_true(st.cancelled >= 30, "cancelled " .. st.cancelled)
  end)

  it("cancels pending work when the loop breaks", function()
    local ex1 = procpool.ProcessPoolExecutor { max_workers = 1 }
    local items = {}
    for i = 1, 40 do items[i] = i end
    for i in ex1:map("spec.tasks.sleep", { 0.01, 0.01, 0.01 }, { timeout = T }) do
      if i == 1 then break end
    end
    for i in ex1:map(function(x) require("procpool.core").sleep(0.01) return x end, items,
      { chunksize = 1, buffersize = 30, timeout = T }) do
      if i == 2 then break end
    end
    ex1:shutdown()
    assert.is_true(ex1:stats().cancelled >= 20)
  end)

  it("raises TimeoutError at the map's deadline, counted from the call (test_map_timeout)", function()
    local got = {}
    local t0 = core.monotonic()
    local ok, e = pcall(function()
      for i, v in ex:map("spec.tasks.sleep", { 0, 0, 2 }, { timeout = 0.5, chunksize = 1 }) do
        got[i] = v or true
      end
    end)
    assert.is_false(ok)
    assert.are.equal("TimeoutError", e.name)
    assert.are.equal(2, #got)
    assert.is_true(core.monotonic() - t0 < 1.5)
  end)

  it("honours chunksize and rejects a bad one (test_map_chunksize)", function()
    local items = {}
    for i = 1, 100 do items[i] = i end
    for _, cs in ipairs({ 1, 6, 50, 400 }) do
      local out = collect(ex:map("spec.tasks.square", items, { chunksize = cs, timeout = T }))
      assert.are.equal(100, out.n)
      for i = 1, 100 do assert.are.equal(i * i, out[i]) end
    end
    assert.has_error(function() ex:map("spec.tasks.square", items, { chunksize = 0 }) end,
      "chunksize must be >= 1.")
  end)

  it("maps a large input with the default chunking", function()
    local items = {}
    for i = 1, 20000 do items[i] = i end
    local sum = 0
    for _, v in ex:map(function(x) return x + 1 end, items, { timeout = 60 }) do sum = sum + v end
    assert.are.equal(20000 * 20001 // 2 + 20000, sum)
  end)

  it("yields nothing for an empty input", function()
    assert.are.same({ n = 0 }, collect(ex:map("spec.tasks.square", {}, { timeout = T })))
  end)

  it("raises after shutdown", function()
    ex:shutdown()
    local ok, e = pcall(ex.map, ex, "spec.tasks.square", { 1 })
    assert.is_false(ok)
    assert.are.equal("InvalidStateError", e.name)
    assert.matches("after shutdown", e.message)
  end)

  it("starmap unpacks each item with its n", function()
    local out = collect(ex:starmap(function(a, b, c) return tostring(a) .. tostring(b) .. tostring(c) end,
      { { 1, 2, 3 }, { "x", nil, "z", n = 3 }, { n = 0 } }, { timeout = T }))
    assert.are.same({ n = 3, "123", "xnilz", "nilnilnil" }, out)
  end)

  it("rejects bad arguments", function()
    assert.has_error(function() ex:map(42, {}) end)
    local ok, e = pcall(ex.map, ex, "spec.tasks.square", 42)
    assert.is_false(ok)
    assert.matches("table or iterator function expected", e)
    ok, e = pcall(ex.map, ex, "spec.tasks.square", {}, { chunk = 2 })
    assert.is_false(ok)
    assert.matches("unknown option 'chunk'", e)
    ok, e = pcall(function()
      for _ in ex:starmap("spec.tasks.add", { 1 }, { timeout = T }) do end
    end)
    assert.is_false(ok)
    assert.matches("starmap item 1 is not a table", e)
  end)
end)

-- The iterators hand out the items of a chunk from C (src/cursor.c): a
-- done chunk's results decoded one by one from its future, or the rest of
-- a run decoded in Lua. Item 1 holds the first chunk back, so the chunks
-- after it are done when iteration reaches them.
describe("the maps' items handed out from a chunk", function()
  local function task(x)
    if x == 1 then require("procpool.core").sleep(0.2) end
    local k = x % 6
    if k == 0 then return { x } end -- a table: for the general decoder
    if k == 1 then return nil end
    if k == 2 then return "s" .. x end
    if k == 3 then return x + 0.5 end
    if k == 4 then return x % 2 == 0, "a second value" end
    return x
  end
  local function want(x)
    local k = x % 6
    if k == 0 then return { x } end
    if k == 1 then return nil end
    if k == 2 then return "s" .. x end
    if k == 3 then return x + 0.5 end
    if k == 4 then return x % 2 == 0 end
    return x
  end
  -- a value the worker can send but the parent cannot rebuild
  local function undecodable(x)
    if x == 1 then require("procpool.core").sleep(0.2) end
    if x ~= 15 then return x end
    package.loaded["only_in_worker"] = { make = function() return {} end }
    return setmetatable({}, { __serialize = function() return "only_in_worker.make" end })
  end

  for _, context in ipairs { "fork", "spawn" } do
    describe("(" .. context .. ")", function()
      local ex, pool
      before_each(function()
        ex = procpool.ProcessPoolExecutor { max_workers = 2, context = context }
        pool = procpool.Pool { processes = 2, context = context }
      end)
      after_each(function()
        ex:shutdown { cancel_futures = true }
        pool:terminate()
        pool:join()
        collectgarbage()
        collectgarbage()
      end)

      it("hands out every kind of result in order (map, imap) or once each (imap_unordered)", function()
        local items = {}
        for i = 1, 60 do items[i] = i end
        for _, iter in ipairs {
          function() return ex:map(task, items, { chunksize = 10, timeout = T }) end,
          function() return pool:imap(task, items, { chunksize = 10, timeout = T }) end,
        } do
          local n = 0
          for i, v in iter() do
            n = n + 1
            assert.are.equal(n, i)
            assert.are.same(want(i), v)
          end
          assert.are.equal(60, n)
        end
        local seen, n = {}, 0
        for i, v in pool:imap_unordered(task, items, { chunksize = 10, timeout = T }) do
          assert.is_nil(seen[i])
          seen[i] = true
          n = n + 1
          assert.are.same(want(i), v)
        end
        assert.are.equal(60, n)
      end)

      it("fails a result it cannot decode at its position: map stops, imap goes on", function()
        local items = {}
        for i = 1, 30 do items[i] = i end
        local got = {}
        local ok, e = pcall(function()
          for i, v in ex:map(undecodable, items, { chunksize = 10, timeout = T }) do got[i] = v end
        end)
        assert.is_false(ok)
        assert.is_true(procpool.is_error(e, "SerializationError"))
        assert.are.equal(14, #got)
        local iter = pool:imap(undecodable, items, { chunksize = 10, timeout = T })
        got = {}
        for _ = 1, 31 do
          local okk, i, v = pcall(iter)
          if not okk then
            got[#got + 1] = procpool.is_error(i, "SerializationError") and "failed" or tostring(i)
          elseif i then
            assert.are.equal(i, v)
            got[#got + 1] = i
          end
        end
        local expect = {}
        for i = 1, 30 do expect[i] = i == 15 and "failed" or i end
        assert.are.same(expect, got)
      end)

      it("delivers an item's reports before the item", function()
        local function reporting(x)
          if x == 1 then require("procpool.core").sleep(0.2) end
          require("procpool").report(x * 10)
          return x
        end
        local items = {}
        for i = 1, 40 do items[i] = i end
        local heard = {}
        local n = 0
        for i in ex:map(reporting, items, { chunksize = 10, timeout = T,
          on_report = function(k, r) heard[k] = r end }) do
          n = n + 1
          assert.are.equal(i * 10, heard[i])
        end
        assert.are.equal(40, n)
      end)

      it("hands out nothing more once the loop is closed, in a chunk's middle", function()
        local items = {}
        for i = 1, 40 do items[i] = i end
        local iter, s, c, closer = ex:map(task, items, { chunksize = 20, timeout = T })
        for _ = 1, 25 do assert.is_not_nil(iter(s, c)) end
        getmetatable(closer).__close(closer)
        assert.is_nil(iter(s, c))
        assert.is_nil(iter())
      end)
    end)
  end
end)
