-- Regression: submit on a closed (collected) executor and start-up
-- failures raised plain strings; every runtime failure of procpool is now
-- an error object (procpool.is_error).
local procpool = require "procpool"

describe("regression: error objects everywhere", function()
  it("raises InvalidStateError from submit on a collected executor", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    getmetatable(ex).__gc(ex) -- what the collector (or lua_close) does
    local ok, e = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "InvalidStateError"))
    assert.are.equal("the executor is closed", e.message)
  end)

  it("raises InvalidStateError from submit after shutdown", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    ex:shutdown()
    local ok, e = pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "InvalidStateError"))
  end)

  it("raises BrokenProcessPool when the spawn context cannot start", function()
    local ok, e = pcall(procpool.ProcessPoolExecutor,
      { max_workers = 1, context = "spawn", executable = "/nonexistent/lua5.4" })
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "BrokenProcessPool"))
    assert.matches("cannot start the spawn context", e.message)
  end)
end)
