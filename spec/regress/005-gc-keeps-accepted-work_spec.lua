-- Regression: an executor collected after shutdown{wait=false} cancelled
-- the tasks it had accepted; they now run to their end.
local procpool = require "procpool"
local H = require "spec.helper"

describe("regression: garbage collection after shutdown{wait=false}", function()
  it("runs every accepted task to its end", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    local futs = {}
    for i = 1, 4 do futs[i] = ex:submit("spec.tasks.sleep", 0.1, i) end
    ex:shutdown { wait = false }
    ex = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    for i, f in ipairs(futs) do assert.are.equal(i, f:result(10)) end
  end)

  it("still cancels the queued tasks of an executor dropped without shutdown", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    local first = ex:submit("spec.tasks.sleep", 0.3, "ran")
    local queued = {}
    for i = 1, 3 do queued[i] = ex:submit("spec.tasks.sleep", 0.3, i) end
    assert.is_true(H.eventually(function() return first:running() end, 5))
    ex = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    assert.are.equal("ran", first:result(10))
    for _, f in ipairs(queued) do
      procpool.wait({ f }, { timeout = 10 })
      assert.is_true(f:cancelled())
    end
  end)
end)
