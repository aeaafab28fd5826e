-- Regression: Ctrl-C in a script waiting inside a `<close>` executor or
-- Pool took as long as every queued task (11 s for 8 x 3 s tasks on 2
-- workers), since a wait sleeping in C never let lua.c's "interrupted!"
-- hook run. The script is run in a process group of its own and the
-- group gets SIGINT, as a terminal sends it.
local core = require "procpool.core"
local H = require "spec.helper"

local SCRIPT = [[
local procpool = require "procpool"
local which, marker = arg[1], arg[2]
if which == "pool" then
  local pool <close> = procpool.Pool { processes = 2 }
  local rs = {}
  for i = 1, 8 do rs[i] = pool:apply_async(os.execute, { "sleep " .. marker }) end
  print("ready") io.stdout:flush()
  rs[8]:get(60)
else
  local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2 }
  local fs = {}
  for i = 1, 8 do fs[i] = ex:submit(os.execute, "sleep " .. marker) end
  print("ready") io.stdout:flush()
  fs[8]:result(60)
end
print("not interrupted")
]]

local count = H.count_procs

local function run(which)
  local script = os.tmpname() .. "-ctrlc.lua"
  local f = io.open(script, "w")
  f:write(SCRIPT)
  f:close()
  local marker = string.format("4.%d%d", H.pid(), which == "pool" and 2 or 1)
  local lua = os.getenv("PROCPOOL_LUA") or "lua5.4"
  -- setsid: a new session and process group, led by the script (its pid)
  local p = io.popen(string.format(
    "exec timeout -s KILL 30 setsid sh -c 'echo $$; exec %s %s %s %s' 2>&1", lua, script, which,
    marker))
  local pgid = tonumber(p:read("l"))
  assert.are.equal("ready", p:read("l"))
  assert.is_true(H.eventually(function() return count("[s]leep " .. marker) >= 2 end, 10))
  local t0 = core.monotonic()
  os.execute("kill -INT -" .. pgid) -- the whole group, as a terminal does
  local out = p:read("a")
  local took = core.monotonic() - t0
  p:close()
  os.remove(script)
  return out, took, marker, script
end

describe("regression: Ctrl-C", function()
  for _, which in ipairs { "executor", "pool" } do
    it("stops a script waiting in a <close> " .. which .. " within 1 s, leaving nothing", function()
      local out, took, marker, script = run(which)
      assert.matches("interrupted!", out, 1, true, "after " .. took .. " s: " .. out)
      assert.is_nil(out:find("not interrupted", 1, true))
      assert.is_true(took < 1.0, "exit took " .. took .. " s")
      -- no worker, zygote or task process is left
      assert.are.equal(0, count("[s]leep " .. marker))
      assert.are.equal(0, count((script:gsub("^(.)", "[%1]"))))
    end)
  end
end)
