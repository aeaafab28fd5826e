-- Regression: a blocking wait looked at the futures of at most 32
-- executors (a wait over more could hang), the callback drain stopped at
-- 64 executors, and every executor left a sentinel in the registry.
local procpool = require "procpool"

local N = 33 -- one past the old limit of 32 engines (kept low: sanitized runs are slow)

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
    local fs = {}
    for i, ex in ipairs(exs) do fs[i] = ex:submit("spec.tasks.sleep", 0.2, i) end
    local done, not_done = procpool.wait(fs, { timeout = 10 })
    assert.are.equal(N, #done)
    assert.are.equal(0, #not_done)
    local n = 0
    for _ in procpool.as_completed(fs, 10) do n = n + 1 end
    assert.are.equal(N, n)
  end)

  it("runs the done callbacks of futures of " .. N .. " executors", function()
    local called, fs = 0, {}
    for i, ex in ipairs(exs) do
      fs[i] = ex:submit("spec.tasks.sleep", 0.1, i)
      fs[i]:add_done_callback(function() called = called + 1 end)
    end
    procpool.wait(fs, { timeout = 10 })
    assert.are.equal(N, called)
  end)

  it("leaves nothing in the registry after 200 executors", function()
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
