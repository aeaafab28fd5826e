-- Regression: a result that could not be decoded in the parent escaped
-- from the Pool's callback machinery (reported as "exception calling
-- callback" on stderr); error_callback was never called and successful()
-- raised. The decode failure is now that task's failure.
local procpool = require "procpool"
local H = require "spec.helper"

-- a value the worker can send but the parent cannot rebuild: its
-- constructor's module exists only in the worker
local function undecodable()
  package.loaded["only_in_worker"] = { make = function() return {} end }
  return setmetatable({}, { __serialize = function() return "only_in_worker.make" end })
end

describe("regression: a result the parent cannot decode", function()
  it("fails the AsyncResult: error_callback, successful() and get()", function()
    local pool = procpool.Pool { processes = 1 }
    local seen
    local r = pool:apply_async(undecodable, {}, { error_callback = function(e) seen = e end,
      callback = function() seen = "callback" end })
    assert.is_true(r:wait(10))
    assert.is_false(r:successful())
    assert.is_true(procpool.is_error(seen, "SerializationError"))
    assert.matches("only_in_worker", seen.message)
    local ok, e = pcall(r.get, r, 1)
    assert.is_false(ok)
    assert.are.equal(seen, e)
    pool:close()
    pool:join()
  end)

  it("fails map_async's result, not the wait", function()
    local pool = procpool.Pool { processes = 1 }
    local seen
    local r = pool:map_async(function(x) return x == 2 and undecodable() or x end, { 1, 2, 3 },
      { error_callback = function(e) seen = e end })
    assert.is_true(r:wait(10))
    assert.is_false(r:successful())
    assert.is_true(procpool.is_error(seen, "SerializationError"))
    pool:close()
    pool:join()
  end)

  it("fails a future with the decode error, once and for all", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    local f = ex:submit(undecodable)
    local e = f:exception(10)
    assert.is_true(procpool.is_error(e, "SerializationError"))
    assert.are.equal(e, f:exception(0)) -- decoded once, cached
    ex:shutdown()
  end)

  it("prints nothing on stderr", function()
    local ok, out, err = H.run_lua([[
      local procpool = require "procpool"
      local pool = procpool.Pool { processes = 1 }
      local r = pool:apply_async(function()
        package.loaded["only_in_worker"] = { make = function() return {} end }
        return setmetatable({}, { __serialize = function() return "only_in_worker.make" end })
      end, {}, { error_callback = function() end })
      r:wait(10)
      print(r:successful())
      pool:close()
      pool:join()
    ]], 20)
    assert.is_true(ok)
    assert.are.equal("false\n", out)
    assert.are.equal("", err)
  end)
end)
