-- Taking back queued work: a worker is handed a few tasks ahead; when the
-- one it runs turns out long while another worker is idle, what it has
-- not started goes to the idle worker. Each item is claimed as it starts
-- (pp_page), so an item runs once, on one worker, however the claim and
-- the taking back race.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 20

local function noop(x) return x end

--- 2000 tiny tasks: the engine then expects tiny items and hands each
--- worker many at once.
local function burst(ex)
  local fs = {}
  for i = 1, 2000 do fs[i] = ex:submit(noop, i) end
  for i = 1, 2000 do fs[i]:result(T) end
end

describe("taking back queued work", function()
  local ex
  before_each(function() ex = procpool.ProcessPoolExecutor { max_workers = 2 } end)
  after_each(function()
    ex:shutdown { cancel_futures = true }
    collectgarbage()
  end)

  it("runs the tasks queued behind a long one on the idle worker", function()
    for _ = 1, 3 do
      burst(ex)
      local t0 = core.monotonic()
      local slow = ex:submit(function() require("procpool.core").sleep(0.5) return "slow" end)
      local fast = {}
      for i = 1, 6 do fast[i] = ex:submit(function(x) require("procpool.core").sleep(0.001) return x end, i) end
      for i = 1, 6 do assert.are.equal(i, fast[i]:result(T)) end
      -- all six done long before the slow task: none waited behind it
      assert.is_true(core.monotonic() - t0 < 0.4, "the fast tasks took " .. core.monotonic() - t0 .. " s")
      assert.is_false(slow:done())
      assert.are.equal("slow", slow:result(T))
    end
  end)

  it("yields a slow item last in imap_unordered(..., 1) right after a burst", function()
    local pool = procpool.Pool { processes = 2 }
    local before = pool._ex:stats().taken_back
    local function nap(s)
      require("procpool.core").sleep(s)
      return s
    end
    for _ = 1, 3 do
      local rs = {}
      for i = 1, 2000 do rs[i] = pool:apply_async(noop, { i }) end
      for i = 1, 2000 do rs[i]:get(T) end
      local order = {}
      for i, v in pool:imap_unordered(nap, { 0.5, 0.001, 0.001, 0.001 }, 1) do
        order[#order + 1] = i .. ":" .. v
      end
      assert.are.equal("1:0.5", order[4], table.concat(order, " "))
    end
    assert.is_true(pool._ex:stats().taken_back > before)
    pool:close()
    pool:join()
  end)

  it("gives the rest of a chunk whose first item is long to the idle worker", function()
    burst(ex)
    local items = { 0.6 }
    for i = 2, 41 do items[i] = 0.002 end
    local t0 = core.monotonic()
    local ids = {}
    -- one chunk of all 41: without taking back, the 40 short items would
    -- run after the long one, on its worker
    for id in ex:map("spec.tasks.sleep_id", items, { chunksize = 41, timeout = T }) do
      ids[#ids + 1] = id
    end
    local took = core.monotonic() - t0
    local others = 0
    for i = 2, 41 do if ids[i] ~= ids[1] then others = others + 1 end end
    assert.are.equal(40, others)
    assert.is_true(took < 0.6 + 0.08 + 0.5, "took " .. took .. " s")
    assert.is_true(ex:stats().taken_back >= 40)
  end)

  it("runs every item exactly once while items are taken back over and over", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. dir))
    local log = dir .. "/runs"
    -- durations that make workers look stuck now and then: 0 to 4 ms
    local items = {}
    local seed = 7
    for i = 1, 600 do
      seed = (seed * 1103515245 + 12345) % 2147483648
      items[i] = { i, (seed % 5) / 1000 }
    end
    local function run(i, s)
      local c = require("procpool.core")
      local f = io.open(log, "a")
      f:write(i, "\n")
      f:close()
      if s > 0 then c.sleep(s) end
      return i
    end
    local got = {}
    for v in ex:starmap(run, items, { chunksize = 20, timeout = T }) do got[#got + 1] = v end
    assert.are.same(H.range(600), got)
    local count = {}
    for line in io.lines(log) do
      local i = tonumber(line)
      count[i] = (count[i] or 0) + 1
    end
    os.execute("rm -rf " .. dir)
    for i = 1, 600 do assert.are.equal(1, count[i], "item " .. i .. " ran " .. tostring(count[i]) .. " times") end
    assert.is_true(ex:stats().taken_back > 0)
    assert.are.same({ 0, 0 }, { ex:stats().pending, ex:stats().running })
  end)

  it("charges a death after a taking back to the item that was running, and only to it", function()
    burst(ex)
    local victim = ex:submit(function()
      local f = io.open("/proc/self/stat")
      local pid = f:read("l"):match("^%d+")
      f:close()
      require("procpool.core").sleep(0.3)
      os.execute("kill -9 " .. pid)
      require("procpool.core").sleep(5)
    end)
    local fast = {}
    for i = 1, 8 do fast[i] = ex:submit(function(x) require("procpool.core").sleep(0.002) return x end, i) end
    for i = 1, 8 do assert.are.equal(i, fast[i]:result(T)) end
    local ok, e = pcall(victim.result, victim, T)
    assert.is_false(ok)
    assert.are.equal("WorkerLost", e.name)
    -- the pool goes on, with a replacement worker
    assert.are.equal(42, ex:submit(noop, 42):result(T))
    assert.are.same({ 0, 0 }, { ex:stats().pending, ex:stats().running })
  end)
end)
