-- Regression: a blocking wait looked at the futures of at most 32
-- executors (a wait over more could hang), the callback drain stopped at
-- 64 executors, and every executor left a sentinel in the registry.
-- Every pool is up before a timed wait. The tests with many pools at once
-- run under the sanitizers too: a zygote is forked while no I/O thread of
-- another pool is inside its work (GCC 12's ASan allocator is not
-- fork-safe, and a fork amid an allocation once hung the child).
local procpool = require "procpool"
local core = require "procpool.core"

local N = 33 -- one past the old limit of 32 engines in a wait
local NCB = 70 -- past the old limit of 64 engines in the callback drain

-- entries under procpool's registry keys (nested tables counted through)
local function registry_size()
  local n = 0
  for k, v in pairs(debug.getregistry()) do
    if type(k) == "string" and k:match("^procpool") then
      n = n + 1
      if type(v) == "table" then
        for _ in pairs(v) do n = n + 1 end
      end
    end
  end
  return n
end

describe("regression: no silent caps", function()
  local exs
  before_each(function()
    exs = {}
    for i = 1, N do exs[i] = procpool.ProcessPoolExecutor { max_workers = 1 } end
  end)
  after_each(function()
    for _, ex in ipairs(exs) do ex:shutdown { cancel_futures = true } end
    collectgarbage()
    collectgarbage()
  end)

  it("waits over the futures of " .. N .. " executors", function()
    -- every pool is up first (slow under sanitizers), so that the wait
    -- below measures the wait alone
    for _, ex in ipairs(exs) do ex:submit("spec.tasks.add", 1, 1):result(60) end
    -- the future of the last executor ends last: a wait that does not
    -- listen to every executor sleeps through it
    local fs = {}
    for i, ex in ipairs(exs) do fs[i] = ex:submit("spec.tasks.sleep", i == N and 0.5 or 0.1, i) end
    local t0 = core.monotonic()
    local done, not_done = procpool.wait(fs, { timeout = 10 })
    assert.is_true(core.monotonic() - t0 < 5)
    assert.are.equal(N, #done)
    assert.are.equal(0, #not_done)
    local n = 0
    for _ in procpool.as_completed(fs, 10) do n = n + 1 end
    assert.are.equal(N, n)
  end)

  it("runs the done callbacks of futures of " .. NCB .. " executors", function()
    for i = N + 1, NCB do exs[i] = procpool.ProcessPoolExecutor { max_workers = 1 } end
    for _, ex in ipairs(exs) do ex:submit("spec.tasks.add", 1, 1):result(60) end
    -- on every executor a quick task, then a long one that keeps the
    -- executor among those with callbacks to run while the wait returns
    local called, quick, long = 0, {}, {}
    for i, ex in ipairs(exs) do
      quick[i] = ex:submit("spec.tasks.sleep", 0.3, i)
      quick[i]:add_done_callback(function() called = called + 1 end)
      long[i] = ex:submit("spec.tasks.sleep", 1.5, i)
      long[i]:add_done_callback(function() end)
    end
    local done = procpool.wait(quick, { timeout = 10 })
    assert.are.equal(NCB, #done)
    assert.are.equal(NCB, called) -- every quick one's callback ran before the wait returned
    procpool.wait(long, { timeout = 10 })
  end)

  it("leaves nothing in the registry after 200 executors", function()
    -- one first: what the first executor of a state sets up stays
    procpool.ProcessPoolExecutor({ max_workers = 1 }):shutdown()
    collectgarbage()
    local before = registry_size()
    for _ = 1, 200 do
      local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
      ex:shutdown()
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(before, registry_size())
  end)
end)
