-- Regression: a finished task's result used to stay in its worker while
-- the worker ran the next task it held (the rest of a chunk, or a task
-- sent ahead), so it arrived only when that task ended.
local procpool = require "procpool"
local core = require "procpool.core"

local function busy(s) -- keep the worker busy without sleeping in C
  local t = core.monotonic() + s
  while core.monotonic() < t do end
  return s
end

describe("regression: results leave the worker at once", function()
  local ex
  before_each(function() ex = procpool.ProcessPoolExecutor { max_workers = 1 } end)
  after_each(function()
    ex:shutdown { cancel_futures = true }
    collectgarbage()
    collectgarbage()
  end)

  it("yields a chunk's first item before its slow second one ends", function()
    local t0 = core.monotonic()
    local it = ex:map(busy, { 0, 0.6 }, { chunksize = 2, timeout = 10 })
    local i, v = it()
    local first = core.monotonic() - t0
    assert.are.same({ 1, 0 }, { i, v })
    assert.is_true(first < 0.3, "first item after " .. first .. " s")
    assert.are.same({ 2, 0.6 }, { it() })
  end)

  it("yields the quick items of a stream before the slow one after them ends", function()
    -- 5000 quick items, then a slow one, in one chunk: the batch the quick
    -- ones left open must not wait for the slow one
    local items = {}
    for k = 1, 5000 do items[k] = 0 end
    items[#items + 1] = 1.0
    local it = ex:map(busy, items, { chunksize = #items, timeout = 20 })
    -- taken with as little work as possible per item (no assertion in
    -- the loop), so that the time measured is the items' arrival
    local bad
    for k = 1, 5000 do
      local i, v = it()
      if not bad and (i ~= k or v ~= 0) then bad = { k, i, v } end
    end
    local t_quick = core.monotonic()
    assert.is_nil(bad)
    assert.are.same({ 5001, 1.0 }, { it() })
    local gap = core.monotonic() - t_quick
    -- the last quick one came at least half the slow one before its end
    assert.is_true(gap > 0.5, "the last quick item came only " .. gap .. " s before the slow one")
  end)

  it("lets wait(FIRST_COMPLETED) return while a task sent ahead runs", function()
    for _ = 1, 200 do ex:submit(busy, 0) end -- tiny tasks: the worker is sent tasks ahead
    ex:submit(busy, 0):result(10)
    local quick = ex:submit(busy, 0)
    local slow = ex:submit(busy, 1.0)
    local t0 = core.monotonic()
    local done = procpool.wait({ quick, slow },
      { return_when = procpool.FIRST_COMPLETED, timeout = 5 })
    local took = core.monotonic() - t0
    assert.are.same({ quick }, done)
    assert.is_true(took < 0.5, "wait returned after " .. took .. " s")
    assert.are.equal(1.0, slow:result(10))
  end)

  it("gives Pool:imap's items as they finish within a chunk", function()
    local pool = procpool.Pool { processes = 1 }
    local t0 = core.monotonic()
    local it = pool:imap(busy, { 0, 0.6 }, 2)
    assert.are.same({ 1, 0 }, { it() })
    local first = core.monotonic() - t0
    assert.is_true(first < 0.3, "first item after " .. first .. " s")
    assert.are.same({ 2, 0.6 }, { it() })
    pool:close()
    pool:join()
  end)
end)
