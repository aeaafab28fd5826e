-- Regression: with output = "capture", the bytes a task wrote just before
-- its worker was SIGKILLed were lost when they were still in the pipes
-- (written, not yet read by the worker's drain thread): WorkerLost.stdout
-- and f:output() missed them. The spec of a SIGKILLed task in
-- 19-output_spec.lua failed that way once, under load.
--
-- Each task writes from Lua (these bytes the drain thread usually reads
-- in time), then has a shell write more and SIGKILL the worker at once
-- (these usually are still in the pipes). With "stopped", the shell stops
-- the worker first: then the drain thread cannot read them at all.
local procpool = require "procpool"
local H = require "spec.helper"

local T = 10 -- seconds: the timeout on every blocking call here
local ROUNDS = 20

-- n lines of 6 bytes, numbered from `from` (so a lost or repeated part shows)
local function lines(tag, from, n)
  local t = {}
  for i = from, from + n - 1 do t[#t + 1] = string.format("%s%04d\n", tag, i % 10000) end
  return table.concat(t)
end

-- A task: Lua writes lua_out and lua_err, then a shell writes sh_out and
-- sh_err and kills the worker (stopping it first when `stopped`).
local function dying_task(lua_out, lua_err, sh_out, sh_err, stopped)
  return function()
    io.write(lua_out)
    io.stdout:flush()
    io.stderr:write(lua_err)
    os.execute((stopped and "kill -STOP $PPID; " or "")
      .. "printf '%s' '" .. sh_out .. "'; printf '%s' '" .. sh_err .. "' >&2; kill -9 $PPID")
    require("procpool.core").sleep(5)
  end
end

local function lost(f)
  local ok, e = pcall(f.result, f, T)
  assert.is_false(ok)
  assert.is_true(procpool.is_error(e, "WorkerLost"), tostring(e))
  assert.are.equal(9, e.signal)
  return e
end

for _, context in ipairs({ "fork", "spawn" }) do
  describe("regression: output in the pipes when the worker is SIGKILLed (" .. context .. ")", function()
    local ex
    after_each(function()
      if ex then ex:shutdown() end
      ex = nil
      collectgarbage()
      collectgarbage()
    end)

    for _, stopped in ipairs({ false, true }) do
      local how = stopped and "stopped, then " or ""
      it("keeps every byte written until the worker was " .. how .. "killed, " .. ROUNDS .. " times",
        function()
          ex = procpool.ProcessPoolExecutor { max_workers = 2, context = context, output = "capture" }
          -- 16 KiB per stream: well under a pipe's 64 KiB, so no write blocks
          local lua_out, sh_out = lines("o", 0, 700), lines("o", 700, 2000)
          local lua_err, sh_err = lines("e", 0, 700), lines("e", 700, 2000)
          for round = 1, ROUNDS do
            local f = ex:submit(dying_task(lua_out, lua_err, sh_out, sh_err, stopped))
            local e = lost(f)
            assert.are.equal(#lua_out + #sh_out, #e.stdout, "stdout, round " .. round)
            assert.are.equal(lua_out .. sh_out, e.stdout, "stdout, round " .. round)
            assert.are.equal(lua_err .. sh_err, e.stderr, "stderr, round " .. round)
            local out, err = f:output(T)
            assert.are.equal(lua_out .. sh_out, out)
            assert.are.equal(lua_err .. sh_err, err)
          end
          -- the replacement captures as before
          local g = ex:submit(function() io.write("after") end)
          g:result(T)
          assert.are.equal("after", (g:output(T)))
        end)

      it("keeps max_output bytes and notes the rest, when the worker was " .. how .. "killed",
        function()
          ex = procpool.ProcessPoolExecutor { max_workers = 1, context = context, output = "capture",
            max_output = 1000 }
          -- 600 bytes from Lua, 2400 from the shell: 1000 kept, 2000 dropped
          local lua_out, sh_out = lines("o", 0, 100), lines("o", 100, 400)
          -- stderr: 1200 from Lua, past the limit before the shell writes
          local lua_err, sh_err = lines("e", 0, 200), lines("e", 200, 100)
          for round = 1, 5 do
            local e = lost(ex:submit(dying_task(lua_out, lua_err, sh_out, sh_err, stopped)))
            assert.are.equal((lua_out .. sh_out):sub(1, 1000)
              .. "\n[procpool: 2000 bytes of output dropped]\n", e.stdout, "round " .. round)
            assert.are.equal(lua_err:sub(1, 1000)
              .. "\n[procpool: 800 bytes of output dropped]\n", e.stderr, "round " .. round)
          end
        end)
    end

    it("gives each item its own bytes, past the limit and across items, and a death after them", function()
      ex = procpool.ProcessPoolExecutor { max_workers = 1, context = context, output = "capture",
        max_output = "20K" }
      -- 9 KiB to 27 KiB per item (some past the limit), on one worker
      for i = 1, 12 do
        local n = 1500 * (1 + i % 3) -- lines of 6 bytes
        local f = ex:submit(function(k, m)
          io.write(string.rep(string.char(96 + k), 6 * m))
          io.stderr:write("item " .. k .. "\n")
          return k
        end, i, n)
        assert.are.equal(i, f:result(T))
        local out, err = f:output(T)
        local kept = math.min(6 * n, 20 * 1024)
        local note = 6 * n > kept and ("\n[procpool: " .. (6 * n - kept) .. " bytes of output dropped]\n") or ""
        assert.are.equal(string.rep(string.char(96 + i), kept) .. note, out, "item " .. i)
        assert.are.equal("item " .. i .. "\n", err)
      end
      local e = lost(ex:submit(dying_task("dying out\n", "dying err\n", "sh out\n", "sh err\n", false)))
      assert.are.equal("dying out\nsh out\n", e.stdout)
      assert.are.equal("dying err\nsh err\n", e.stderr)
    end)

    it("does not wait for a process the task started that still holds the pipes", function()
      ex = procpool.ProcessPoolExecutor { max_workers = 1, context = context, output = "capture" }
      local core = require "procpool.core"
      local t0 = core.monotonic()
      -- the background sleep keeps the pipes' write ends open after the kill
      local e = lost(ex:submit(function()
        os.execute("(sleep 2 &); printf 'before'; kill -9 $PPID")
        require("procpool.core").sleep(5)
      end))
      assert.is_true(core.monotonic() - t0 < 1.5, "the loss waited for the sleep")
      assert.are.equal("before", e.stdout)
      assert.are.equal("", e.stderr)
    end)

    it("kills no worker when the captures' fds would fill this process's fd table", function()
      -- 30 captures would hold 120 fds here: past half of 128, the rest
      -- are not kept (their deaths come without output), and no frame's
      -- fd is refused for want of room (its worker would be killed, and
      -- the pool stalled)
      if not os.execute("command -v prlimit >/dev/null") then return pending("no prlimit") end
      local ok, out, err, code = H.run_lua([[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor { max_workers = 30, context = "]] .. context .. [[",
          output = "capture" }
        local fs, good = {}, 0
        for i = 1, 60 do
          fs[i] = ex:submit(function(x) require("procpool.core").sleep(0.1) print(x) return x end, i)
        end
        for i = 1, 60 do
          local done, v = pcall(fs[i].result, fs[i], 30)
          if done and v == i and fs[i]:output(1) == i .. "\n" then good = good + 1 end
        end
        ex:shutdown()
        print(good)
      ]], 60, "prlimit --nofile=128:128")
      assert.is_true(ok, "exit " .. tostring(code) .. "; stdout: " .. out .. "; stderr: " .. err)
      assert.are.equal("60\n", out)
    end)

    it("leaves no fd open in the parent after killed workers and a shutdown", function()
      local before = H.settled_fd_count(T)
      ex = procpool.ProcessPoolExecutor { max_workers = 2, context = context, output = "capture" }
      for _ = 1, 4 do
        lost(ex:submit(function()
          print("x")
          os.execute("kill -9 $PPID")
          require("procpool.core").sleep(5)
        end))
      end
      ex:submit(function() print("alive") end):result(T)
      ex:shutdown()
      ex = nil
      assert.are.equal(before, H.settled_fd_count(T))
    end)
  end)
end
