-- Regression: a worker started while this process's fd table was full
-- sent its channel's fds, and the kernel dropped those that did not fit.
-- The engine ignored the short message, so the slot waited for that
-- worker forever: its tasks never ran and shutdown never returned. The
-- spec "kills no worker when the captures' fds would fill this process's
-- fd table" (013) hung that way once in a few runs, under load.
--
-- Here the fd table is filled on purpose while a worker that died is
-- replaced, then freed: the replacement must come once there is room
-- again, run the task waiting for it, and let shutdown end.
local H = require "spec.helper"

for _, context in ipairs({ "fork", "spawn" }) do
  describe("regression: a worker's fds lost at its start (" .. context .. ")", function()
    it("starts it again once there is room: its task runs and shutdown returns", function()
      if not os.execute("command -v prlimit >/dev/null") then return pending("no prlimit") end
      local ok, out, err, code = H.run_lua([[
        local procpool = require "procpool"
        local core = require "procpool.core"
        local ex = procpool.ProcessPoolExecutor { max_workers = 2, context = "]] .. context .. [[" }
        -- one worker busy all along: the pool is never without a worker
        local long = ex:submit(function() require("procpool.core").sleep(2) return "long" end)
        assert(ex:submit(function() return 1 end):result(10) == 1) -- the other one is up
        -- fill the fd table; the task below ends its worker, which frees
        -- its 3 fds here, and its replacement brings 4: they cannot all
        -- arrive, and the next task waits for that slot
        local held = {}
        while true do
          local f = io.open("/dev/null")
          if not f then break end
          held[#held + 1] = f
        end
        local lost = ex:submit(function() os.exit(3) end)
        assert(procpool.is_error(lost:exception(10), "WorkerLost"))
        local f = ex:submit(function() return 3 end)
        core.sleep(0.5) -- starts tried (and lost) meanwhile
        local early = f:done()
        for _, h in ipairs(held) do h:close() end
        held = nil -- luacheck: ignore 311
        local v = f:result(10)
        io.write(tostring(early), " ", tostring(v), " ", tostring(long:done()), " ")
        assert(long:result(10) == "long")
        ex:shutdown()
        io.write("shut down")
      ]], 30, "prlimit --nofile=64:64")
      assert.is_true(ok, "exit " .. tostring(code) .. "; stdout: " .. out .. "; stderr: " .. err)
      -- task 3 ran on the slot started again, before the long task ended
      assert.are.equal("false 3 false shut down", out)
    end)
  end)
end
