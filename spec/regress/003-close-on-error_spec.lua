-- Regression: a `<close>` executor or Pool left by an error waited for
-- every queued task (8 x 3 s on 2 workers: 12 s). Left by an error, the
-- scope now cancels what is pending, stops what runs (and what its tasks
-- started) and reaps the workers at once; a normal exit still waits.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local function sleepers(marker) return H.count_procs("[s]leep " .. marker) end

describe("regression: <close> left by an error", function()
  it("stops an executor's work within 1 s", function()
    local marker = string.format("3.%d1", H.pid())
    local futs, t0
    local ok, e = pcall(function()
      local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2 }
      futs = {}
      for i = 1, 8 do futs[i] = ex:submit(os.execute, "sleep " .. marker) end
      assert.is_true(H.eventually(function() return sleepers(marker) >= 2 end, 5))
      t0 = core.monotonic()
      error("boom", 0)
    end)
    local took = core.monotonic() - t0
    assert.is_false(ok)
    assert.are.equal("boom", e)
    assert.is_true(took < 1.0, "took " .. took)
    local cancelled, failed = 0, 0
    for _, f in ipairs(futs) do
      assert.is_true(f:done())
      if f:cancelled() then
        cancelled = cancelled + 1
      else
        failed = failed + 1
        assert.is_true(procpool.is_error(f:exception(1), "BrokenProcessPool"))
      end
    end
    assert.are.equal(6, cancelled)
    assert.are.equal(2, failed)
    assert.are.equal(0, sleepers(marker)) -- what the tasks started is gone too
  end)

  it("is quick: the scope's error reaches the caller well within 1 s", function()
    local t0
    local ok = pcall(function()
      local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2 }
      local first = ex:submit("spec.tasks.add", 1, 1)
      for _ = 1, 8 do ex:submit("spec.tasks.sleep", 3) end
      first:result(10)
      t0 = core.monotonic()
      error("boom")
    end)
    assert.is_false(ok)
    assert.is_true(core.monotonic() - t0 < 1.0)
  end)

  it("stops a Pool's work within 1 s", function()
    local rs, t0 = {}, nil
    local ok = pcall(function()
      local pool <close> = procpool.Pool { processes = 2 }
      local first = pool:apply_async("spec.tasks.add", { 1, 1 })
      for i = 1, 8 do rs[i] = pool:apply_async("spec.tasks.sleep", { 3 }) end
      first:get(10)
      t0 = core.monotonic()
      error("boom")
    end)
    assert.is_false(ok)
    assert.is_true(core.monotonic() - t0 < 1.0)
    for _, r in ipairs(rs) do
      assert.is_true(r:ready())
      assert.is_false(r:successful())
    end
  end)

  it("still waits for every task on a normal exit", function()
    local futs = {}
    do
      local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2 }
      for i = 1, 4 do futs[i] = ex:submit("spec.tasks.sleep", 0.1, i) end
    end
    for i, f in ipairs(futs) do assert.are.equal(i, f:result(0)) end
  end)
end)
