-- Regression: a worker said why its initializer failed on stderr only
-- after telling the parent, which then killed it: when the parent shut
-- down at once, the message could be lost. It is now written first, and
-- the parent forwards a dead worker's stderr before the pool ends.
local H = require "spec.helper"

describe("regression: an initializer's failure message", function()
  it("reaches stderr when the parent shuts down at once", function()
    for _ = 1, 3 do
      local ok, _, err = H.run_lua([[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor {
          max_workers = 2, initializer = function() error("init failed 4711", 0) end }
        pcall(ex.submit, ex, "spec.tasks.add", 1, 2)
        ex:shutdown()
      ]], 20)
      assert.is_true(ok)
      assert.matches("exception in initializer: init failed 4711", err)
    end
  end)
end)
