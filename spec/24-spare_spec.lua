-- Large values travel in memfds (from 256 KiB). A task's memfd is let go
-- of when the task ends, and the pages of one finished memfd are kept per
-- process as the spare for the next large value (buf.h): a worker keeps a
-- task's memfd once it has claimed every item in it, the parent keeps a
-- result's. Reused memory must never be read by two tasks: every value
-- here is distinct and checked whole.
local procpool = require "procpool"
local H = require "spec.helper"

local T = 20

-- the parent's open memfds of values (not its pages or capture files)
local function value_memfds()
  local n = 0
  local p = io.popen("ls -l /proc/" .. H.pid() .. "/fd 2>/dev/null")
  for line in p:lines() do
    if line:find("/memfd:procpool (deleted)", 1, true) then n = n + 1 end
  end
  p:close()
  return n
end

-- a string of `size` bytes, different for every `tag`
local function big(tag, size)
  local unit = string.format("<%s>", tag)
  return unit:rep(size // #unit + 1):sub(1, size)
end

local function flip(s) return s:reverse() end

describe("large values", function()
  local ex
  before_each(function()
    collectgarbage()
    collectgarbage()
    ex = procpool.ProcessPoolExecutor { max_workers = 2 }
  end)
  after_each(function()
    ex:shutdown { cancel_futures = true }
    collectgarbage()
    collectgarbage()
  end)

  it("are let go of when their task ends, while its future is kept", function()
    local before = value_memfds()
    local fs = {}
    for i = 1, 6 do fs[i] = ex:submit(function(s) return #s end, big(i, 1 << 20)) end
    for i = 1, 6 do assert.are.equal(1 << 20, fs[i]:result(T)) end
    -- one may stay as the spare; the six arguments are gone
    assert.is_true(value_memfds() <= before + 1, value_memfds() .. " memfds, " .. before .. " before")
    assert.are.equal(6, #fs)
  end)

  it("kept by the dozen as results hold a few fds, not one each", function()
    local before = value_memfds()
    local fs = {}
    for i = 1, 24 do fs[i] = ex:submit(big, i, 300 << 10) end
    for i = 1, 24 do assert.are.equal(300 << 10, #fs[i]:result(T)) end
    -- results are mappings; a few keep their fd to become the spare
    assert.is_true(value_memfds() <= before + 5, value_memfds() .. " memfds, " .. before .. " before")
  end)

  it("come back exactly, round after round, in memfds used again", function()
    for round = 1, 12 do
      local fs, want = {}, {}
      for i = 1, 4 do
        local s = big(round * 10 + i, (300 << 10) * i + round)
        want[i] = s:reverse()
        fs[i] = ex:submit(flip, s)
      end
      for i = 1, 4 do
        local got = fs[i]:result(T)
        assert.is_true(got == want[i], "round " .. round .. " task " .. i .. " came back wrong")
      end
      if round % 2 == 0 then collectgarbage() end -- results freed: the parent's spare
    end
  end)

  it("are exact in a chunk whose rest is taken back, and taken back again", function()
    -- worker A runs the long first item of a chunk, worker B is given the
    -- rest of it (taken back from A); when A is free it runs new tasks
    -- with large results while B still reads the chunk's memfd: A must
    -- not have kept that memfd for its results
    local pool = procpool.Pool { processes = 2 }
    local rs = {}
    for i = 1, 2000 do rs[i] = pool:apply_async(function(x) return x end, { i }) end
    for i = 1, 2000 do rs[i]:get(T) end -- deep windows
    local function work(s)
      local kind = s:sub(1, 4)
      require("procpool.core").sleep(kind == "slow" and 0.6 or kind == "midd" and 0.4 or 0.01)
      return s:upper()
    end
    for round = 1, 2 do
      local items = {}
      for i = 1, 8 do
        items[i] = (i == 1 and "slow" or i <= 4 and "midd" or "fast") .. big(round * 10 + i, 300 << 10)
      end
      local m = pool:map_async(work, items, { chunksize = 4 })
      require("procpool.core").sleep(0.5)
      local late, lw = {}, {}
      for i = 1, 4 do
        local s = big("late" .. round .. i, 400 << 10)
        lw[i] = s:upper()
        late[i] = pool:apply_async(work, { s })
      end
      local got = m:get(T)
      for i = 1, 8 do assert.is_true(got[i] == items[i]:upper(), "item " .. i .. " came back wrong") end
      for i = 1, 4 do assert.is_true(late[i]:get(T) == lw[i], "late task " .. i .. " came back wrong") end
    end
    assert.is_true(pool._ex:stats().taken_back > 0, "nothing was taken back: the case was not made")
    pool:close()
    pool:join()
  end)

  it("are exact when a worker dies writing a large result right after a chunk", function()
    -- the chunk's results may still wait in the worker when it dies; its
    -- items are then sent again from the chunk's memfd, which the worker
    -- must not have reused for the large result it was writing
    local pool = procpool.Pool { processes = 1 }
    local function sum(s) return s:sub(-12) .. #s end -- of its last bytes, and whole
    local function die_writing()
      local boom = setmetatable({}, { __serialize = function() os.exit(3) end })
      return ("k"):rep(400 << 10), boom
    end
    for round = 1, 12 do
      local items, want = {}, {}
      for i = 1, 400 do
        items[i] = big(round * 1000 + i, 1024)
        want[i] = items[i]:sub(-12) .. 1024
      end
      local m = pool:map_async(sum, items, { chunksize = 400 })
      local d = pool:apply_async(die_writing)
      local got = m:get(T)
      for i = 1, 400 do assert.are.equal(want[i], got[i]) end
      local ok, e = pcall(d.get, d, T)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "WorkerLost"), tostring(e))
    end
    pool:close()
    pool:join()
  end)

  it("are exact when a worker dies holding a chunk of them", function()
    local items, want = {}, {}
    for i = 1, 12 do
      items[i] = (i == 2 and "die!" or "live") .. big(i, 300 << 10)
      want[i] = items[i]:upper()
    end
    local function work(s)
      if s:sub(1, 4) == "die!" then os.exit(3) end
      return s:upper()
    end
    local fs = {}
    for i = 1, 12 do fs[i] = ex:submit(work, items[i]) end
    for i = 1, 12 do
      local ok, v = pcall(fs[i].result, fs[i], T)
      if i == 2 then
        assert.is_false(ok)
        assert.is_true(procpool.is_error(v, "WorkerLost"), tostring(v))
      else
        assert.is_true(ok, tostring(v))
        assert.is_true(v == want[i], "task " .. i .. " came back wrong")
      end
    end
  end)

  it("are backed by huge pages in a worker, where the system gives them", function()
    local f = io.open("/sys/kernel/mm/transparent_hugepage/enabled")
    local mode = f and f:read("l") or "[never]"
    if f then f:close() end
    -- the worker's memory in huge pages gained by a new block of n bytes
    local function huge_kb(n)
      local function now_kb()
        local r = io.open("/proc/self/smaps_rollup")
        local kb = r and tonumber(r:read("a"):match("AnonHugePages:%s*(%d+)")) or 0
        if r then r:close() end
        return kb
      end
      collectgarbage("stop") -- nothing freed in between
      local before = now_kb()
      local s = ("x"):rep(n)
      local gained = now_kb() - before
      collectgarbage("restart")
      return gained, #s
    end
    local kb, n = ex:submit(huge_kb, 16 << 20):result(T)
    assert.are.equal(16 << 20, n)
    if mode:find("[never]", 1, true) then
      assert.are.equal(0, kb) -- the advice is ignored, nothing else changes
    else
      assert.is_true(kb >= 8192, mode .. ": " .. kb .. " kB in huge pages")
    end
    -- small blocks are left alone
    if mode:find("[madvise]", 1, true) then -- (with "always" any block may be)
      assert.are.equal(0, (ex:submit(huge_kb, 1 << 20):result(T)))
    end
  end)

  it("work in a pool inside a task of a pool with a memory limit", function()
    local outer = procpool.ProcessPoolExecutor { max_workers = 1, limits = { memory = "256M" } }
    local function nested(n)
      local inner = require("procpool").ProcessPoolExecutor { max_workers = 1 }
      local s = inner:submit(function(k) return ("n"):rep(k) end, n):result(20)
      inner:shutdown()
      return #s
    end
    assert.are.equal(8 << 20, outer:submit(nested, 8 << 20):result(T))
    outer:shutdown()
  end)

  it("leave no memfd open once the pools are gone", function()
    local before = value_memfds()
    local e2 = procpool.ProcessPoolExecutor { max_workers = 1 }
    for i = 1, 3 do assert.are.equal(1 << 20, #e2:submit(flip, big(i, 1 << 20)):result(T)) end
    e2:shutdown()
    e2 = nil -- luacheck: ignore 311
    ex:shutdown()
    ex = nil
    collectgarbage()
    collectgarbage()
    assert.is_true(value_memfds() <= before, value_memfds() .. " memfds, " .. before .. " before")
    ex = procpool.ProcessPoolExecutor { max_workers = 1 } -- for after_each
  end)
end)
