-- procpool.wait and procpool.as_completed, ported from CPython's
-- test_wait / test_as_completed (with procpool's own choices: a cancelled
-- future is done and wakes waiters; as_completed's deadline starts at the
-- call).
local procpool = require "procpool"
local core = require "procpool.core"

local T = 10

describe("waiting", function()
  local ex
  before_each(function() ex = procpool.ProcessPoolExecutor { max_workers = 2 } end)
  after_each(function()
    ex:shutdown { cancel_futures = true }
    collectgarbage()
  end)

  local function done_futures()
    local ok = ex:submit("spec.tasks.add", 40, 2)
    local err = ex:submit("spec.tasks.fail", "E")
    procpool.wait({ ok, err }, { timeout = T })
    return ok, err
  end

  describe("wait", function()
    it("lists a duplicated future once (test_20369)", function()
      local f = ex:submit("spec.tasks.add", 1, 1)
      local done, not_done = procpool.wait({ f, f }, { timeout = T })
      assert.are.same({ f }, done)
      assert.are.same({}, not_done)
    end)

    it("returns two empty arrays for no futures", function()
      local done, not_done = procpool.wait({})
      assert.are.same({}, done)
      assert.are.same({}, not_done)
    end)

    it("keeps input order in both arrays", function()
      local slow = ex:submit("spec.tasks.sleep", 1.0)
      local a, b = done_futures()
      local done, not_done = procpool.wait({ b, slow, a }, { timeout = 0 })
      assert.are.same({ b, a }, done)
      assert.are.same({ slow }, not_done)
    end)

    it("FIRST_COMPLETED returns at the first completion (test_first_completed)", function()
      local fast = ex:submit("spec.tasks.sleep", 0.05, "fast")
      local slow = ex:submit("spec.tasks.sleep", 1.5)
      local t0 = core.monotonic()
      local done, not_done = procpool.wait({ slow, fast },
        { timeout = T, return_when = procpool.FIRST_COMPLETED })
      assert.is_true(core.monotonic() - t0 < 1.0)
      assert.are.same({ fast }, done)
      assert.are.same({ slow }, not_done)
    end)

    it("FIRST_COMPLETED returns at once with what is already done", function()
      local ok, err = done_futures()
      local slow = ex:submit("spec.tasks.sleep", 1.5)
      local t0 = core.monotonic()
      local done, not_done = procpool.wait({ ok, slow, err },
        { timeout = T, return_when = procpool.FIRST_COMPLETED })
      assert.is_true(core.monotonic() - t0 < 0.5)
      assert.are.same({ ok, err }, done)
      assert.are.same({ slow }, not_done)
    end)

    it("counts a cancelled future as done (it never hangs)", function()
      local ex1 = procpool.ProcessPoolExecutor { max_workers = 1 }
      local busy = {}
      for i = 1, 8 do busy[i] = ex1:submit("spec.tasks.sleep", 0.3) end
      local c = busy[8]
      assert.is_true(c:cancel())
      local t0 = core.monotonic()
      local done = procpool.wait({ c, busy[1] }, { timeout = T,
        return_when = procpool.FIRST_COMPLETED })
      assert.is_true(core.monotonic() - t0 < 0.2)
      assert.are.same({ c }, done)
      local done2, nd2 = procpool.wait({ c }, { timeout = T })
      assert.are.same({ c }, done2)
      assert.are.same({}, nd2)
      ex1:shutdown { cancel_futures = true }
    end)

    it("FIRST_EXCEPTION returns at the first failure (test_first_exception)", function()
      local f1 = ex:submit("spec.tasks.add", 1, 1)
      f1:result(T)
      local f2 = ex:submit(function() require("procpool.core").sleep(0.1) error("x") end)
      local f3 = ex:submit("spec.tasks.sleep", 1.5)
      local t0 = core.monotonic()
      local done, not_done = procpool.wait({ f1, f2, f3 },
        { timeout = T, return_when = procpool.FIRST_EXCEPTION })
      assert.is_true(core.monotonic() - t0 < 1.0)
      assert.are.same({ f1, f2 }, done)
      assert.are.same({ f3 }, not_done)
    end)

    it("FIRST_EXCEPTION returns at once when one already failed", function()
      local _, err = done_futures()
      local slow = ex:submit("spec.tasks.sleep", 1.5)
      local t0 = core.monotonic()
      local done, not_done = procpool.wait({ err, slow }, { timeout = T,
        return_when = procpool.FIRST_EXCEPTION })
      assert.is_true(core.monotonic() - t0 < 0.5)
      assert.are.same({ err }, done)
      assert.are.same({ slow }, not_done)
    end)

    it("FIRST_EXCEPTION does not count a cancelled future as a failure", function()
      local ex1 = procpool.ProcessPoolExecutor { max_workers = 1 }
      local fs = {}
      for i = 1, 8 do fs[i] = ex1:submit("spec.tasks.sleep", 0.05, i) end
      fs[8]:cancel()
      local done, not_done = procpool.wait(fs, { timeout = T,
        return_when = procpool.FIRST_EXCEPTION })
      assert.are.equal(8, #done) -- it waited for all
      assert.are.equal(0, #not_done)
      ex1:shutdown()
    end)

    it("ALL_COMPLETED waits for all (test_all_completed)", function()
      local fs = {}
      for i = 1, 5 do fs[i] = ex:submit("spec.tasks.sleep", 0.02 * i, i) end
      fs[6] = ex:submit("spec.tasks.fail", "E")
      local done, not_done = procpool.wait(fs, { timeout = T,
        return_when = procpool.ALL_COMPLETED })
      assert.are.equal(6, #done)
      assert.are.equal(0, #not_done)
    end)

    it("returns the split on timeout without raising (test_timeout)", function()
      local ok, err = done_futures()
      local slow = ex:submit("spec.tasks.sleep", 1.5)
      local t0 = core.monotonic()
      local done, not_done = procpool.wait({ ok, err, slow }, { timeout = 0.1 })
      local waited = core.monotonic() - t0
      assert.is_true(waited >= 0.09 and waited < 0.5, "waited " .. waited)
      assert.are.same({ ok, err }, done)
      assert.are.same({ slow }, not_done)
    end)

    it("rejects bad arguments", function()
      local f = ex:submit("spec.tasks.add", 1, 1)
      assert.has_error(function() procpool.wait({ f }, { return_when = "SOMETIMES" }) end,
        "Invalid return condition: SOMETIMES")
      local ok, e = pcall(procpool.wait, { f, 42 })
      assert.is_false(ok)
      assert.matches("item 2 is not a future", e)
      ok, e = pcall(procpool.wait, { f }, { timeout = T, when = 1 })
      assert.is_false(ok)
      assert.matches("unknown option 'when'", e)
      f:result(T)
    end)
  end)

  describe("as_completed", function()
    it("yields every distinct future once (test_no_timeout, test_duplicate_futures)", function()
      local ok, err = done_futures()
      local a = ex:submit("spec.tasks.sleep", 0.1, "a")
      local b = ex:submit("spec.tasks.sleep", 0.05, "b")
      local seen, n = {}, 0
      for f in procpool.as_completed({ ok, a, err, b, a, a }, T) do
        assert.is_nil(seen[f])
        seen[f] = true
        n = n + 1
      end
      assert.are.equal(4, n)
    end)

    it("yields done futures first, then in completion order", function()
      local ok = done_futures()
      local slow = ex:submit("spec.tasks.sleep", 0.4, "slow")
      local fast = ex:submit("spec.tasks.sleep", 0.1, "fast")
      local order = {}
      for f in procpool.as_completed({ slow, fast, ok }, T) do order[#order + 1] = f end
      assert.are.same({ ok, fast, slow }, order)
    end)

    it("raises TimeoutError naming what is left (test_correct_timeout_exception_msg)", function()
      local ok, err = done_futures()
      local s1 = ex:submit("spec.tasks.sleep", 1.5)
      local s2 = ex:submit("spec.tasks.sleep", 1.5)
      local it = procpool.as_completed({ ok, err, s1, s2 }, 0.1)
      local got = { it(), it() }
      assert.are.equal(2, #got)
      local okc, e = pcall(it)
      assert.is_false(okc)
      assert.are.equal("TimeoutError", e.name)
      assert.are.equal("2 (of 4) futures unfinished", e.message)
      assert.is_nil(it()) -- finished after the timeout
    end)

    it("with timeout 0 yields the done futures, then times out (test_future_times_out)", function()
      local ok, err = done_futures()
      local slow = ex:submit("spec.tasks.sleep", 1.5)
      local n = 0
      local okc, e = pcall(function()
        for _ in procpool.as_completed({ ok, slow, err }, 0) do n = n + 1 end
      end)
      assert.is_false(okc)
      assert.are.equal("1 (of 3) futures unfinished", e.message)
      assert.are.equal(2, n)
    end)

    it("counts the timeout from the call, not the first step", function()
      local slow = ex:submit("spec.tasks.sleep", 1.5)
      local it = procpool.as_completed({ slow }, 0.2)
      core.sleep(0.3)
      local t0 = core.monotonic()
      local okc, e = pcall(it)
      assert.is_false(okc)
      assert.are.equal("TimeoutError", e.name)
      assert.is_true(core.monotonic() - t0 < 0.1)
    end)

    it("yields nothing for no futures", function()
      local n = 0
      for _ in procpool.as_completed({}) do n = n + 1 end
      assert.are.equal(0, n)
    end)

    it("keeps no reference to futures it has yielded (test_free_reference)", function()
      local weak = setmetatable({}, { __mode = "k" })
      local it
      do
        local f = ex:submit("spec.tasks.add", 1, 1)
        weak[f] = true
        it = procpool.as_completed({ f }, T)
        assert.are.equal(f, it())
      end
      collectgarbage()
      collectgarbage()
      assert.is_nil(next(weak))
      assert.is_nil(it())
    end)
  end)
end)

-- lua.c turns Ctrl-C into the error "interrupted!" through a hook that runs
-- at the next Lua instruction; a wait that slept again after the signal
-- would keep the user waiting until its timeout.
describe("Ctrl-C during a wait", function()
  local H = require "spec.helper"
  local waits = {
    ["f:result(T)"] = "f:result(60)",
    ["procpool.wait"] = "procpool.wait({ f }, { timeout = 60 })",
    ["ex:poll(T)"] = "ex:poll(0) ex:poll(60)", -- (the first takes the quick task's end)
  }
  for name, call in pairs(waits) do
    it("ends " .. name .. " with lua's 'interrupted!' at once", function()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      local script, ready, wpid = dir .. "/wait.lua", dir .. "/ready", dir .. "/worker"
      local f = assert(io.open(script, "w"))
      f:write(string.format([[
local procpool = require "procpool"
local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
ex:submit(function() end):result(30) -- the pool is up
local f = ex:submit(function()
  local w = io.open(%q, "w")
  w:write(io.open("/proc/self/stat"):read("l"):match("^%%d+"))
  w:close()
  require("procpool.core").sleep(30)
end)
while not io.open(%q) do require("procpool.core").sleep(0.01) end
io.open(%q, "w"):close()
%s
print("the wait ended without the interrupt")
]], wpid, wpid, ready, call))
      f:close()
      local lua = os.getenv("PROCPOOL_LUA") or "lua5.4"
      local t0 = core.monotonic()
      local p = io.popen(string.format("timeout 60 sh -c '%s %s 2>%s/err & p=$!; "
        .. "for i in $(seq 300); do [ -e %s ] && break; sleep 0.05; done; sleep 0.2; "
        .. "kill -INT $p; wait $p; echo status $?'", lua, script, dir, ready))
      local out = p:read("a")
      p:close()
      local elapsed = core.monotonic() - t0
      local ef = io.open(dir .. "/err")
      local err = ef and ef:read("a") or ""
      if ef then ef:close() end
      local pf = io.open(wpid)
      local worker = pf and tonumber(pf:read("a"))
      if pf then pf:close() end
      os.execute("rm -rf " .. dir)
      assert.matches("interrupted!", err)
      assert.is_number(worker)
      -- the executor closed as the interpreter exited: its worker is gone
      assert.is_true(H.eventually(function() return H.proc_state(worker) == nil end, 10))
      assert.matches("status 1\n", out)
      assert.is_nil(out:find("without the interrupt", 1, true))
      assert.is_true(elapsed < 10, "it took " .. elapsed .. " s")
    end)
  end
end)
