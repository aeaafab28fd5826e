-- Workers on hosts: the agent started by a launcher and spoken to over
-- its stdin and stdout. The hosts here are this machine (":") and test
-- launchers (functions), and a private sshd on 127.0.0.1 (spec/sshd.lua).
-- No traffic leaves the loopback interface.
local procpool = require "procpool"
local hosts = require "procpool.hosts"
local core = require "procpool.core"
local H = require "spec.helper"
local sshd = require "spec.sshd"
local slurm = require "spec.slurm"

local T = 20

local function agents() return H.count_procs("[_]agent()") end

-- A sanitized build's library needs its runtime preloaded in the agents
-- too, which neither ssh nor a launcher run without it passes on: for
-- remote.env (nil in a plain run).
local function runtime_env()
  if not os.getenv("LD_PRELOAD") then return nil end
  local env = {}
  for _, k in ipairs({ "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" }) do env[k] = os.getenv(k) end
  return env
end

-- the agent of this machine's host entry, run by a launcher function
-- that wraps it (so that tests can find, stop and kill it)
local function here_argv(_, argv) return argv end

local function quiet_pool(opts)
  opts.host_timeout = opts.host_timeout or 5
  return procpool.ProcessPoolExecutor(opts)
end

-- the pid of the agent a worker runs under: its zygote's parent
local function agent_of(ex)
  local zygote = ex:submit(function()
    local f = io.open("/proc/self/stat")
    local s = f:read("a")
    f:close()
    return s:match("^%d+ %b() %a (%d+)")
  end):result(T)
  local f = io.open("/proc/" .. zygote .. "/stat")
  local s = f:read("a")
  f:close()
  return tonumber(s:match("^%d+ %b() %a (%d+)"))
end

describe("hosts", function()
  after_each(function()
    collectgarbage()
    collectgarbage()
    assert.is_true(H.eventually(function() return agents() == 0 end, 10), "an agent is left")
  end)

  describe("sshlogins", function()
    it("parse as GNU parallel's: [N/][sshcommand [options]] [user@]host, ':' for here", function()
      assert.are.same({ name = "node1", host = "node1", ssh = { "ssh" } }, hosts.parse_login("node1"))
      assert.are.same({ name = "alice@node2", host = "alice@node2", workers = 8, ssh = { "ssh" } },
        hosts.parse_login("8/alice@node2"))
      assert.are.same({ name = "node3", host = "node3", workers = 2, ssh = { "ssh", "-p", "2222" } },
        hosts.parse_login(" 2/ssh -p 2222 node3 "))
      assert.are.same({ name = ":", host = ":", here = true }, hosts.parse_login(":"))
      assert.are.same({ name = ":", host = ":", here = true, workers = 3 }, hosts.parse_login("3/:"))
      assert.are.same({ name = "n", host = "n", ssh = { "/usr/bin/ssh", "-l", "bob" } },
        hosts.parse_login("/usr/bin/ssh -l bob n"))
      local _, why = hosts.parse_login("@grp/node")
      assert.matches("groups", why)
      _, why = hosts.parse_login("0/node")
      assert.matches("at least 1", why)
      _, why = hosts.parse_login("  ")
      assert.matches("names no host", why)
      _, why = hosts.parse_login("ssh :")
      assert.matches("takes no ssh command", why)
    end)

    it("come as lists, tables, comma-separated strings and sshlogin files", function()
      local e = assert(hosts.entries("2/a, b,,:"))
      assert.are.same({ "a", "b", ":" }, { e[1].name, e[2].name, e[3].name })
      assert.are.equal(2, e[1].workers)
      e = assert(hosts.entries({ { host = "n", workers = 3, ssh = { "ssh", "-p", "2" } }, ":" }))
      assert.are.same({ "ssh", "-p", "2" }, e[1].ssh)
      assert.is_nil((hosts.entries({ { host = "n", workers = 0 } })))
      assert.is_nil((hosts.entries({ { host = "n", color = 1 } })))
      assert.is_nil((hosts.entries({})))
      assert.is_nil((hosts.entries(42)))
      local path = os.tmpname()
      local f = io.open(path, "w")
      f:write("# cluster\n4/node1\n\n  node2  # the other\n:\n")
      f:close()
      assert.are.same({ "4/node1", "node2", ":" }, hosts.read_file(path))
      os.remove(path)
      assert.is_nil((hosts.read_file(path)))
    end)

    it("expand Slurm's node lists and CPU counts", function()
      assert.are.same({ "node01", "node02", "node03", "node07", "gpu5" },
        hosts.expand_nodelist("node[01-03,07],gpu5"))
      assert.are.same({ "a1", "b" }, hosts.expand_nodelist("a1,b"))
      assert.are.same({ 2, 2, 2, 1 }, hosts.expand_counts("2(x3),1"))
    end)

    it("become one shell word each in the remote command, whatever they hold", function()
      for _, s in ipairs({ "plain", "it's", "a b", "$HOME", "`x`", "\"q\"", "semi;colon", "" }) do
        local p = io.popen("sh -c " .. hosts.sh_quote("printf %s " .. hosts.sh_quote(s)))
        assert.are.equal(s, p:read("a"))
        p:close()
      end
      local argv = hosts.launch_argv(assert(hosts.parse_login("2/ssh -p 2222 n3")), "ssh",
        { env = { A = "1 2" }, dir = "/tmp/x y" })
      assert.are.same({ "ssh", "-p", "2222" }, { argv[1], argv[2], argv[3] })
      assert.are.equal("n3", argv[#argv - 1])
      assert.matches("^cd '/tmp/x y' && exec env 'A=1 2' lua5.4 %-e '", argv[#argv])
      local srun = hosts.launch_argv({ host = "nodeA", name = "nodeA" }, "slurm", {})
      assert.are.equal("srun", srun[1])
      assert.truthy(table.concat(srun, " "):find("--nodelist=nodeA", 1, true))
    end)
  end)

  describe("this machine through the agent", function()
    it("runs closures with upvalues, functions by name and values, exactly", function()
      local ex <close> = quiet_pool { hosts = { "2/:" } }
      local k, t = 10, { a = { 1, 2 }, [true] = "yes" }
      assert.are.equal(15, ex:submit(function(x) return x + k end, 5):result(T))
      assert.are.same(t, ex:submit(function(v) return v end, t):result(T))
      assert.are.equal(49, ex:submit("spec.tasks.square", 7):result(T))
      local w = ex:submit(function() return require("procpool").current_worker() end):result(T)
      assert.are.equal(":", w.host)
      assert.is_nil(procpool.current_worker())
      local seen = {}
      for _, v in ex:map(function(x) return x * 2 end, H.range(100), { chunksize = 7 }) do
        seen[#seen + 1] = v
      end
      assert.are.equal(100, #seen)
      assert.are.equal(200, seen[100])
    end)

    it("raises task errors with the host's traceback, and a dead worker is WorkerLost", function()
      local ex <close> = quiet_pool { hosts = { "1/:" } }
      local ok, e = pcall(function() return ex:submit("spec.tasks.fail", "bad"):result(T) end)
      assert.is_false(ok)
      assert.are.equal("bad", e)
      local f = ex:submit(function() os.exit(7) end)
      ok, e = pcall(f.result, f, T)
      assert.is_false(ok)
      assert.are.equal("WorkerLost", e.name)
      assert.matches("exit code 7%), on host ':'", tostring(e))
      assert.are.equal(":", e.host)
      assert.are.equal("back", ex:submit(function() return "back" end):result(T))
    end)

    it("stops a task past its deadline on its host, C code and children too", function()
      local ex <close> = quiet_pool { hosts = { "1/:" } }
      local t0 = core.monotonic()
      local f = ex:submit_with({ timeout = 0.3 }, function() os.execute("sleep 5") end)
      local ok, e = pcall(f.result, f, T)
      assert.is_false(ok)
      assert.are.equal("DeadlineExceeded", e.name)
      assert.is_true(core.monotonic() - t0 < 2)
      assert.is_true(H.eventually(function() return H.count_procs("[s]leep 5") == 0 end, 5))
      assert.are.equal(1, ex:submit(function() return 1 end):result(T))
    end)

    it("runs the initializer in each worker; Pool takes hosts too", function()
      local pool <close> = procpool.Pool { hosts = { "2/:" }, initializer = function(x) _G.BASE = x end,
        initargs = { 100 } }
      assert.are.same({ 101, 102, 103, n = 3 }, pool:map(function(x) return _G.BASE + x end, { 1, 2, 3 }))
      assert.are.equal(100, pool:apply(function() return _G.BASE end))
      assert.matches("%(2 processes%)", tostring(pool))
    end)

    it("replaces a worker on its host after max_tasks_per_child tasks", function()
      local ex <close> = quiet_pool { hosts = { "1/:" }, max_tasks_per_child = 2 }
      local pids = {}
      for i = 1, 6 do
        pids[ex:submit(function() return require("procpool").current_worker().pid end):result(T)] = i
      end
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      assert.are.equal(3, n)
    end)

    it("moves 16 MiB arguments and results through the link", function()
      local ex <close> = quiet_pool { hosts = { "1/:" } }
      local big = string.rep("abcdefgh", 2 << 20)
      local r = ex:submit(function(s) return s:upper() end, big):result(60)
      assert.are.equal(#big, #r)
      assert.are.equal(big:upper(), r)
    end)

    it("starts at most 10 hosts at a time (sshd's MaxStartups)", function()
      local log = os.tmpname()
      local list = {}
      for i = 1, 25 do list[i] = "1/h" .. i end
      local ex <close> = quiet_pool { hosts = list, launcher = function(_, argv)
        return { "sh", "-c", "date +%s%N >> " .. log .. "; sleep 0.3; exec \"$0\" \"$@\"",
          table.unpack(argv) }
      end }
      assert.are.equal(25, ex:_nworkers())
      local starts = {}
      for l in io.lines(log) do starts[#starts + 1] = tonumber(l) / 1e9 end
      os.remove(log)
      table.sort(starts)
      assert.are.equal(25, #starts)
      local first_wave = 0
      for _, t in ipairs(starts) do
        if t - starts[1] < 0.2 then first_wave = first_wave + 1 end
      end
      assert.are.equal(10, first_wave)
      assert.is_true(starts[25] - starts[1] >= 0.5) -- three waves
    end)

    it("sizes a host without a count by its CPUs", function()
      local ex <close> = quiet_pool { hosts = { ":" } }
      assert.are.equal(core.cpu_count(), ex:_nworkers())
    end)
  end)

  describe("host loss", function()
    it("by SIGKILL: the running task is WorkerLost, the rest run elsewhere, the pool goes on", function()
      local ex <close> = quiet_pool { hosts = { { host = "a", workers = 1 }, { host = "b", workers = 1 } },
        launcher = here_argv }
      local agent = agent_of(ex)
      local fs = {}
      for i = 1, 6 do
        fs[i] = ex:submit(function(v) local t = os.time() + 1 while os.time() < t do end return v end, i)
      end
      core.sleep(0.3)
      os.execute("kill -9 " .. agent)
      local lost, done = 0, 0
      for i = 1, 6 do
        local ok, v = pcall(fs[i].result, fs[i], T)
        if ok then
          assert.are.equal(i, v)
          done = done + 1
        else
          assert.are.equal("WorkerLost", v.name)
          assert.matches("^host lost: ", v.reason)
          assert.is_truthy(v.host == "a" or v.host == "b")
          assert.matches("on host '%a' was lost with its host", tostring(v))
          lost = lost + 1
        end
      end
      assert.are.equal(1, lost)
      assert.are.equal(5, done)
      assert.are.equal("on", ex:submit(function() return "on" end):result(T))
    end)

    it("by SIGSTOP: silence past host_timeout loses it; every host lost breaks the pool", function()
      local ex = quiet_pool { hosts = { { host = "only", workers = 1 } }, launcher = here_argv,
        host_timeout = 1, reconnect = false }
      local agent = agent_of(ex)
      local f = ex:submit(function() local t = os.time() + 3 while os.time() < t do end end)
      core.sleep(0.2)
      local t0 = core.monotonic()
      os.execute("kill -STOP " .. agent)
      local ok, e = pcall(f.result, f, T)
      local took = core.monotonic() - t0
      os.execute("kill -CONT " .. agent .. " 2>/dev/null")
      assert.is_false(ok)
      assert.are.equal("WorkerLost", e.name)
      assert.are.equal("host lost: connection lost: no message for 1 s", e.reason)
      assert.are.equal("only", e.host)
      assert.is_true(took < 3, "lost after " .. took .. " s")
      assert.is_true(H.eventually(function()
        local ok2, e2 = pcall(function() return ex:submit(function() end):result(T) end)
        return not ok2 and e2.name == "BrokenProcessPool"
      end, 5))
      ex:shutdown()
    end)
  end)

  describe("reconnects", function()
    -- a script that loses its one host's agent (its zygote's parent) while
    -- a task runs there, with `reconnect` as given; LAUNCH is its argv
    local function lose_once(reconnect, launch)
      return [[
        local procpool = require "procpool"
        local core = require "procpool.core"
        local ex = procpool.ProcessPoolExecutor { hosts = { { host = "h", workers = 1 } },
          host_timeout = 5, reconnect = ]] .. reconnect .. [[,
          launcher = function(_, argv) return ]] .. launch .. [[ end }
        local agent = ex:submit(function()
          local f = io.open("/proc/self/stat") local s = f:read("a") f:close()
          return s:match("^%d+ %b() %a (%d+)")
        end):result(10)
        local f = ex:submit(function() core.sleep(5) end)
        core.sleep(0.2)
        os.execute("kill -9 " .. agent)
        local _, e = pcall(f.result, f, 10)
        print(e.name, e.host)
        local t0 = core.monotonic()
        local ok, v = pcall(function() return ex:submit(function() return "back" end):result(20) end)
        print(ok and v or v.name, string.format("%.1f", core.monotonic() - t0))
        local h = ex:stats().hosts[1]
        print(h.host, h.state, h.workers, h.losses, h.reconnects, h.reason)
        if not ok then print(tostring(v)) end
        ex:shutdown()
      ]]
    end

    -- lose_once's script run: its output lines, its stderr
    local function run_lines(reconnect, launch)
      local ok, out, err = H.run_lua(lose_once(reconnect, launch), 60)
      assert.is_true(ok, err)
      local lines = {}
      for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
      return lines, err
    end

    it("a lost host comes back after the delay: new workers there, the pool goes on", function()
      local lines, err = run_lines("{ attempts = 2, delay = 0.5 }", "argv")
      assert.are.equal("WorkerLost\th", lines[1])
      local back, took = lines[2]:match("^(%S+)\t(%S+)$")
      assert.are.equal("back", back)
      assert.is_true(tonumber(took) >= 0.4 and tonumber(took) < 5, took)
      -- (the agent's end of the stream, or its exit, whichever is seen first)
      assert.matches("^h\tup\t1\t1\t1\t%a", lines[3])
      assert.matches("procpool: host 'h' lost: [^\n]+; reconnecting in 0%.5 s %(1 of 2%)\n", err)
      assert.matches("procpool: host 'h' reconnected\n", err)
    end)

    it("a host that cannot come back is given up after its attempts, with doubling delays", function()
      -- the first launch runs the agent, the next ones find the host unreachable
      local flag = os.tmpname()
      os.remove(flag)
      local launch = string.format([[{ "sh", "-c", "if [ -e %s ]; then echo 'ssh: connect to host h port 22: " ..
        "Connection refused' >&2; exit 255; fi; touch %s; exec \"$0\" \"$@\"", table.unpack(argv) }]], flag, flag)
      local lines, err = run_lines("{ attempts = 2, delay = 0.3 }", launch)
      os.remove(flag)
      assert.are.equal("WorkerLost\th", lines[1])
      local name, took = lines[2]:match("^(%S+)\t(%S+)$")
      assert.are.equal("BrokenProcessPool", name)
      assert.is_true(tonumber(took) >= 0.8 and tonumber(took) < 6, took) -- 0.3 + 0.6 s of waits
      assert.matches("^h\tfailed\t1\t1\t0\tcannot reach it: ssh: connect to host h port 22: Connection refused$",
        lines[3])
      assert.matches("every host of the pool is lost: host 'h': cannot reach it: ssh: connect to host h " ..
        "port 22: Connection refused", lines[4])
      assert.matches("reconnecting in 0%.3 s %(1 of 2%)", err)
      assert.matches("reconnecting in 0%.6 s %(2 of 2%)", err)
      assert.matches("no reconnects left", err)
    end)

    it("reconnect = false loses the host for good at once", function()
      local ok, out, err = H.run_lua(lose_once("false", "argv"), 60)
      assert.is_true(ok, err)
      assert.matches("\nBrokenProcessPool\t", out)
      assert.matches("\nh\tfailed\t1\t1\t0\t", out)
      assert.is_nil(err:find("reconnecting"))
    end)

    it("a shutdown does not wait for a lost host's reconnect, and leaves nothing running", function()
      local ex = quiet_pool { hosts = { { host = "w", workers = 1 } }, launcher = here_argv,
        reconnect = { attempts = 2, delay = 30 } }
      local agent = agent_of(ex)
      os.execute("kill -9 " .. agent)
      assert.is_true(H.eventually(function() return ex:stats().hosts[1].state == "lost" end, 10))
      local t0 = core.monotonic()
      ex:shutdown()
      assert.is_true(core.monotonic() - t0 < 3)
      assert.is_true(H.eventually(function() return agents() == 0 end, 10))
    end)

    it("refuses a bad reconnect option", function()
      for _, bad in ipairs({ { 1 }, { attempts = -1 }, { attempts = 1.5 }, { delay = 0 }, { tries = 2 }, "yes" }) do
        local ok, e = pcall(procpool.ProcessPoolExecutor, { hosts = { ":" }, reconnect = bad })
        assert.is_false(ok)
        assert.matches("reconnect", tostring(e))
      end
      local ok, e = pcall(procpool.ProcessPoolExecutor, { max_workers = 1, reconnect = false })
      assert.is_false(ok)
      assert.matches("reconnect is for pools with hosts", tostring(e))
    end)
  end)

  describe("captured output", function()
    it("captures output on hosts as here; a dead worker's item has its stderr tail", function()
      local ex <close> = quiet_pool { hosts = { { host = "c", workers = 2 } }, launcher = here_argv,
        output = "capture" }
      local f = ex:submit(function(x)
        print("out", x)
        io.stderr:write("err ", x, "\n")
        os.execute("echo from-sh")
        return x * 2
      end, 21)
      assert.are.equal(42, f:result(T))
      assert.are.same({ "out\t21\nfrom-sh\n", "err 21\n" }, { f:output() })
      local big = ex:submit(function() io.write(string.rep("z", 512 << 10)) end) -- (a memfd's worth)
      big:result(T)
      assert.are.equal(512 << 10, #big:output())
      local g = ex:submit_with({ output = "inherit" }, function() return 1 end)
      assert.are.equal(1, g:result(T))
      assert.is_nil(g:output())
      local d = ex:submit(function() io.stderr:write("dying\n") os.exit(3) end)
      local e = d:exception(T)
      assert.are.equal("WorkerLost", e.name)
      assert.are.equal("c", e.host)
      assert.is_nil(d:output())
      local outs = {}
      for _ in ex:map(function(x) io.write("m", x) return x end, { 1, 2, 3 },
        { on_output = function(i, o) outs[i] = o end }) do
      end
      assert.are.same({ "m1", "m2", "m3" }, outs)
      assert.are.same({ "after\n", "" }, { ex:submit(function() print("after") end):output() })
      local pool <close> = procpool.Pool { hosts = { { host = "p", workers = 1 } }, launcher = here_argv,
        output = "capture", host_timeout = 5 }
      local seen = {}
      local r = pool:map_async(function(x) print("from pool " .. x) return x end, { 4, 5 },
        { on_output = function(i, o) seen[i] = o end })
      local got = r:get(T)
      assert.are.same({ 4, 5 }, { got[1], got[2] })
      assert.are.same({ "from pool 4\n", "from pool 5\n" }, seen)
    end)

    it("procpool map -S --group writes each record's output before its result", function()
      local script = os.tmpname()
      local f = assert(io.open(script, "w"))
      f:write("return function(line) print('saw ' .. line) io.stderr:write('e', line, '\\n') ",
        "return line:upper() end\n")
      f:close()
      local p = io.popen("printf 'a\\nb\\nc\\n' | timeout 60 bin/procpool map " .. script ..
        " -S 2/: --group --chunksize 1 2>/dev/null")
      local out = p:read("a")
      p:close()
      os.remove(script)
      assert.are.equal("saw a\nA\nsaw b\nB\nsaw c\nC\n", out)
    end)
  end)

  describe("stats().hosts", function()
    it("tells each host's state, workers, round trip and last message", function()
      local ex <close> = quiet_pool { hosts = { "2/:", { host = "b", workers = 1 } }, launcher = here_argv }
      assert.are.equal(1, ex:submit(function() return 1 end):result(T))
      core.sleep(1.3) -- a heartbeat has gone both ways
      local st = ex:stats()
      assert.are.equal(3, st.workers)
      assert.are.equal(2, #st.hosts)
      local a, b = st.hosts[1], st.hosts[2]
      assert.are.equal(":", a.host)
      assert.are.equal("b", b.host)
      assert.are.same({ "up", 2, 0, 0 }, { a.state, a.workers, a.losses, a.reconnects })
      assert.are.same({ "up", 1 }, { b.state, b.workers })
      assert.is_true(a.rtt > 0 and a.rtt < 1, tostring(a.rtt))
      assert.is_true(a.last_seen >= 0 and a.last_seen < 2, tostring(a.last_seen))
      assert.is_nil(a.reason)
      assert.is_nil(procpool.ProcessPoolExecutor { max_workers = 1 }:stats().hosts)
    end)

    it("a host that failed at start is listed with its reason", function()
      local ex <close> = quiet_pool { hosts = { "1/:", "n9" }, start_timeout = 10, launcher = function()
        return { "sh", "-c", "echo 'ssh: Could not resolve hostname n9' >&2; exit 255" }
      end }
      local h = ex:stats().hosts
      assert.are.same({ "up", 1 }, { h[1].state, h[1].workers })
      assert.are.same({ "n9", "failed", 0 }, { h[2].host, h[2].state, h[2].workers })
      assert.matches("cannot reach it: ssh: Could not resolve hostname n9", h[2].reason)
    end)
  end)

  describe("ship_modules", function()
    -- a pure-Lua module that only this process can find (its
    -- package.path, not LUA_PATH: the agents do not see it)
    local dir
    setup(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      local f = assert(io.open(dir .. "/pp_shipped.lua", "w"))
      f:write("local M = {}\nfunction M.twice(x) return 2 * x end\n",
        "function M.fail() error('shipped error') end\nreturn M\n")
      f:close()
      package.path = dir .. "/?.lua;" .. package.path
    end)
    teardown(function()
      package.path = package.path:gsub("^[^;]*;", "")
      package.loaded.pp_shipped = nil
      os.execute("rm -rf " .. dir)
    end)

    it("sends a module the hosts do not have; functions by name and tracebacks name its file", function()
      -- (not ":", whose agent has this process's package.path)
      local one = { { host = "s", workers = 1 } }
      local without <close> = quiet_pool { hosts = one, launcher = here_argv }
      local e = without:submit(function() return require("pp_shipped").twice(1) end):exception(T)
      assert.matches("module 'pp_shipped' not found", tostring(e))
      local ex <close> = quiet_pool { hosts = one, launcher = here_argv, remote = { ship_modules = { "pp_shipped" } },
        initializer = function() _G.INIT_SAW = require("pp_shipped").twice(10) end }
      local f = ex:submit(function(x) return require("pp_shipped").twice(x) + _G.INIT_SAW - 20 end, 21)
      assert.are.equal(42, f:result(T))
      assert.are.equal(8, ex:submit("pp_shipped.twice", 4):result(T))
      local err = ex:submit("pp_shipped.fail"):exception(T)
      assert.matches("pp_shipped%.lua:3: shipped error", tostring(err))
    end)

    it("names a module it cannot ship", function()
      local ok, e = pcall(procpool.ProcessPoolExecutor,
        { hosts = { ":" }, remote = { ship_modules = { "no_such_mod_x" } } })
      assert.is_false(ok)
      assert.matches("no Lua source for module 'no_such_mod_x'", tostring(e))
      ok, e = pcall(procpool.Pool, { hosts = { ":" }, remote = { ship_modules = "pp_shipped" } })
      assert.is_false(ok)
      assert.matches("ship_modules must be a list of module names", tostring(e))
    end)

    it("procpool map --ship-module sends what the script requires", function()
      local script = dir .. "/uses.lua"
      local f = assert(io.open(script, "w"))
      f:write("local s = require 'pp_shipped'\nreturn function(line) return s.twice(tonumber(line)) end\n")
      f:close()
      -- a stand-in for ssh that runs the command here with the repository's paths only
      local fake = dir .. "/fakessh"
      f = assert(io.open(fake, "w"))
      f:write("#!/bin/sh\nfor a; do last=$a; done\n",
        "export LUA_PATH='lua/?.lua;lua/?/init.lua;;'\nexec sh -c \"$last\"\n")
      f:close()
      local env = "LUA_PATH='" .. dir .. "/?.lua;lua/?.lua;lua/?/init.lua;;' "
      local function run(extra)
        local p = io.popen("printf '1\\n2\\n3\\n' | " .. env .. "timeout 60 bin/procpool map " .. script ..
          " -S 1/nohost --ssh 'sh " .. fake .. "' " .. extra .. " 2>&1")
        local out = p:read("a")
        p:close()
        return out
      end
      assert.matches("module 'pp_shipped' not found", run(""))
      assert.are.equal("2\n4\n6\n", run("--ship-module pp_shipped"))
    end)
  end)

  describe("start-up errors name the host and what to do", function()
    -- a pool made after them works
    local function ex_ok_after()
      local ex <close> = quiet_pool { hosts = { "1/:" } }
      return ex:submit(function() return 7 end):result(T)
    end

    local function start_error(opts)
      opts.start_timeout = opts.start_timeout or 10
      local ok, e = pcall(procpool.ProcessPoolExecutor, opts)
      assert.is_false(ok)
      assert.are.equal("BrokenProcessPool", e.name)
      return tostring(e)
    end

    it("unreachable, no interpreter, no procpool, another Lua", function()
      assert.matches("host 'n1': cannot reach it: ssh: connect to host n1 port 22: Connection refused",
        start_error { hosts = { "n1" }, launcher = function()
          return { "sh", "-c", "echo 'ssh: connect to host n1 port 22: Connection refused' >&2; exit 255" }
        end })
      assert.matches("host ':': it has no 'lua5.4%-missing' on its PATH %(set remote.executable%)",
        start_error { hosts = { ":" }, remote = { executable = "lua5.4-missing" } })
      assert.matches("host 'n2': procpool is not installed there %(module 'procpool.core' not found",
        start_error { hosts = { "n2" }, launcher = here_argv,
          remote = { lua_path = "/nonexistent/?.lua", lua_cpath = "/nonexistent/?.so" } })
      assert.matches("host 'n3': it runs Lua 5%.3; procpool needs Lua 5%.4",
        start_error { hosts = { "n3" }, launcher = function()
          return { "lua5.4", "-e", "io.write('\\0PPERR lua Lua 5.3\\n') os.exit(3)" }
        end })
    end)

    it("another protocol, a silent host, and the good hosts go on without a bad one", function()
      -- an agent that speaks protocol 99
      local fake = "local m = 'proto=99\\ncodec=1\\nlua=' .. 'x' .. '\\n' " ..
        "io.write('\\0PPAGENT', string.pack('<I4BBI2', #m, 16, 0, 0), m) io.flush() io.read('a')"
      assert.matches("host 'n4': it runs procpool protocol 99, codec 1, x",
        start_error { hosts = { "n4" }, launcher = function() return { "lua5.4", "-e", fake } end })
      assert.matches("host 'n5': did not start the procpool agent within 1 s",
        start_error { hosts = { "n5" }, start_timeout = 1, launcher = function()
          return { "sleep", "30" }
        end })
      assert.is_true(H.eventually(function() return H.count_procs("[s]leep 30") == 0 end, 5))
      local ok, out, err = H.run_lua([[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor { hosts = { "1/:", "bad" }, launcher = function()
          return { "sh", "-c", "exit 255" } end }
        print(ex:_nworkers(), ex:submit(function() return "fine" end):result(10))
        ex:shutdown()
      ]], 30)
      assert.is_true(ok, err)
      assert.are.equal("1\tfine\n", out)
      assert.matches("procpool: host 'bad' failed: cannot reach it", err)
    end)

    it("200 hosts entries that all fail: one error naming each (regression: the C stack)", function()
      local list = {}
      for i = 1, 200 do list[i] = "1/n" .. i end
      local e = start_error { hosts = list, launcher = function() return { "sh", "-c", "exit 255" } end }
      assert.matches("host 'n1': cannot reach it", e)
      assert.matches("host 'n200': cannot reach it", e)
      assert.are.equal(7, ex_ok_after())
    end)

    it("bad options are refused", function()
      assert.has_error(function() procpool.ProcessPoolExecutor { hosts = ":", max_workers = 2 } end,
        "with hosts, give the count per host ('4/node1') or workers_per_host, not max_workers")
      assert.has_error(function() procpool.Pool { hosts = ":", processes = 2 } end,
        "with hosts, give the count per host ('4/node1') or workers_per_host, not processes")
      assert.has_error(function() procpool.ProcessPoolExecutor { launcher = "ssh" } end,
        "launcher is for pools with hosts")
      assert.has_error(function() procpool.ProcessPoolExecutor { hosts = ":", launcher = "rsh" } end)
      assert.has_error(function() procpool.ProcessPoolExecutor { hosts = ":", host_timeout = 0 } end,
        "host_timeout must be a number of seconds > 0")
      assert.has_error(function() procpool.ProcessPoolExecutor { hosts = ":", context = "fork" } end)
      assert.has_error(function() procpool.ProcessPoolExecutor { hosts = ":", remote = { nope = 1 } } end,
        "unknown remote option 'nope'")
      assert.has_error(function() procpool.ProcessPoolExecutor { hosts = { "@g/x" } } end)
      assert.has_error(function() procpool.ProcessPoolExecutor { hosts = { "@g/x" } } end)
    end)

    it("PROCPOOL_HOSTS is the default hosts", function()
      local ok, out, err = H.run_lua([[
        local procpool = require "procpool"
        local ex = procpool.ProcessPoolExecutor {}
        print(ex:_nworkers(), ex:submit(function() return procpool.current_worker().host end):result(10))
        ex:shutdown()
      ]], 30, "env PROCPOOL_HOSTS=3/:")
      assert.is_true(ok, err)
      assert.are.equal("3\t:\n", out)
    end)
  end)

  describe("over ssh to a private sshd on 127.0.0.1", function()
    local server, why
    setup(function() server, why = sshd.start() end)
    teardown(function() if server then server.stop() end end)

    local function ssh_login(n, alias) return n .. "/" .. table.concat(server.ssh, " ") .. " " .. alias end
    -- our search paths (relative to the repository when run by make test)
    local cwd = io.popen("pwd"):read("*l")
    local inherit = { lua_path = "inherit", lua_cpath = "inherit", dir = cwd, env = runtime_env() }

    it("runs on both hosts, and a refused connection names the host", function()
      assert.is_truthy(server, why)
      local ex <close> = quiet_pool { hosts = { ssh_login(1, "pp-loop"), ssh_login(1, "pp-loop2") },
        remote = inherit }
      local seen = {}
      local fs = {}
      for i = 1, 30 do
        fs[i] = ex:submit(function() local t = os.clock() + 0.02 while os.clock() < t do end
          return require("procpool").current_worker().host end)
      end
      for i = 1, 30 do seen[fs[i]:result(T)] = true end
      assert.is_true(seen["pp-loop"] and seen["pp-loop2"])
      local ok, e = pcall(procpool.ProcessPoolExecutor, { hosts = { "ssh -o BatchMode=yes -p 1 127.0.0.1" } })
      assert.is_false(ok)
      assert.matches("host '127.0.0.1': cannot reach it: ssh: connect to host 127.0.0.1 port 1: Connection refused",
        tostring(e))
    end)

    it("moves a 64 MiB result, and a killed local ssh leaves nothing running on the host", function()
      assert.is_truthy(server, why)
      local ex = quiet_pool { hosts = { ssh_login(1, "pp-loop") }, remote = inherit }
      local r = ex:submit(function(n) return string.rep("q", n) end, 64 << 20):result(120)
      assert.are.equal(64 << 20, #r)
      r = nil -- luacheck: ignore 311
      -- the proxy is our child; its child is the ssh
      local f = ex:submit(function() local t = os.time() + 5 while os.time() < t do end end)
      core.sleep(0.3)
      for _, proxy in ipairs(H.children()) do
        for _, ssh in ipairs(H.children(proxy)) do os.execute("kill -9 " .. ssh) end
      end
      local ok, e = pcall(f.result, f, T)
      assert.is_false(ok)
      assert.are.equal("WorkerLost", e.name)
      ex:shutdown()
      assert.is_true(H.eventually(function() return agents() == 0 end, 10))
    end)

    it("a killed sshd session on the host is a lost host, and its agent stops its workers", function()
      assert.is_truthy(server, why)
      local before = agents()
      local ex = quiet_pool { hosts = { ssh_login(2, "pp-loop") }, remote = inherit, reconnect = false }
      local f = ex:submit(function() local t = os.time() + 30 while os.time() < t do end end)
      local g = ex:submit(function() local t = os.time() + 30 while os.time() < t do end end)
      core.sleep(0.5)
      assert.is_true(agents() > before) -- (the agent, its zygote and its workers)
      -- every session process of the daemon (the listener's children)
      local sessions = H.children(tonumber(server.pid()))
      assert.is_true(#sessions >= 1)
      local t0 = core.monotonic()
      for _, pid in ipairs(sessions) do os.execute("kill -9 " .. pid) end
      for _, fut in ipairs({ f, g }) do
        local ok, e = pcall(fut.result, fut, T)
        assert.is_false(ok)
        assert.are.equal("WorkerLost", e.name)
        assert.are.equal("pp-loop", e.host)
        assert.matches("^host lost: ", e.reason)
      end
      assert.is_true(core.monotonic() - t0 < 5)
      -- the agent saw its stdin close: it and its spinning workers end
      assert.is_true(H.eventually(function() return agents() == before end, 10))
      assert.is_true(H.eventually(function() return H.count_procs("[o]s.time() + 30") == 0 end, 10))
      assert.are.equal("failed", ex:stats().hosts[1].state)
      ex:shutdown()
    end)

    it("procpool map -S runs the script on the hosts, reduce and finish here", function()
      assert.is_truthy(server, why)
      local input = os.tmpname()
      local f = io.open(input, "w")
      for i = 1, 300 do f:write("w", i % 7, " x\n") end
      f:close()
      local function run(extra)
        local p = io.popen("timeout 60 bin/procpool map examples/wordfreq.lua " .. input .. " " .. extra
          .. " 2>&1")
        local out = p:read("a")
        p:close()
        return out
      end
      local ssh = table.concat(server.ssh, " ")
      local here = run("-j 2")
      local there = run("-S '1/" .. ssh .. " pp-loop' --slf /dev/null -S '1/" .. ssh .. " pp-loop2' " ..
        "--remote-path inherit --host-timeout 10")
      os.remove(input)
      assert.are.equal("300\tw\n300\tx\n", here)
      assert.are.equal(here, there)
    end)

    it("starts 40 hosts entries at once", function()
      assert.is_truthy(server, why)
      local list = {}
      for i = 1, 40 do list[i] = ssh_login(1, i % 2 == 0 and "pp-loop" or "pp-loop2") end
      local ex <close> = quiet_pool { hosts = list, remote = inherit, host_timeout = 20 }
      assert.are.equal(40, ex:_nworkers())
      local fs = {}
      for i = 1, 80 do fs[i] = ex:submit(function(x) return x end, i) end
      for i = 1, 80 do assert.are.equal(i, fs[i]:result(T)) end
    end)
  end)
  describe("over a private one-node Slurm", function()
    local cluster, why
    setup(function() cluster, why = slurm.start() end)
    teardown(function() if cluster then cluster.stop() end end)

    -- srun reads SLURM_CONF, from the launcher's environment; it runs
    -- without a sanitized run's preloaded runtime (the agent gets it in
    -- remote.env)
    local function with_conf(_, argv)
      return { "env", "-u", "LD_PRELOAD", "SLURM_CONF=" .. cluster.conf, table.unpack(argv) }
    end

    it("runs workers through srun, and a killed slurmstepd is a lost host within host_timeout", function()
      assert.is_truthy(cluster, why)
      local cwd = io.popen("pwd"):read("*l")
      local remote = { lua_path = "inherit", lua_cpath = "inherit", dir = cwd, env = runtime_env() }
      local srun = hosts.launch_argv({ host = cluster.node, name = cluster.node }, "slurm", remote)
      assert.are.equal("srun", srun[1])
      local ex = quiet_pool { hosts = { "2/" .. cluster.node }, host_timeout = 2, remote = remote,
        launcher = function(host, argv)
          local words = hosts.launch_argv({ host = host, name = host }, "slurm", remote)
          assert.are.same(argv, { table.unpack(words, #words - #argv + 1) })
          return with_conf(host, words)
        end }
      local host, job = ex:submit(function()
        return require("procpool").current_worker().host, os.getenv("SLURM_JOB_ID")
      end):result(T)
      assert.are.equal(cluster.node, host)
      assert.is_truthy(tonumber(job))
      local f = ex:submit(function() local t = os.time() + 30 while os.time() < t do end end)
      core.sleep(0.3)
      local t0 = core.monotonic()
      -- procps under a preloaded sanitizer runtime can deadlock in its own start-up
      os.execute("env -u LD_PRELOAD pkill -9 -x slurmstepd")
      local ok, e = pcall(f.result, f, T)
      local took = core.monotonic() - t0
      assert.is_false(ok)
      assert.are.equal("WorkerLost", e.name)
      assert.matches("^host lost: ", e.reason)
      assert.is_true(took < 4, "lost after " .. took .. " s")
      ex:shutdown()
    end)

    it("inside salloc, launcher = \"slurm\" runs on the allocation's nodes with their CPUs", function()
      assert.is_truthy(cluster, why)
      local cwd = io.popen("pwd"):read("*l")
      local script = os.tmpname()
      local f = assert(io.open(script, "w"))
      f:write([[
        local procpool = require "procpool"
        local env = {}
        for _, k in ipairs({ "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" }) do env[k] = os.getenv(k) end
        local ex = procpool.ProcessPoolExecutor { launcher = "slurm", host_timeout = 10,
          remote = { lua_path = "inherit", lua_cpath = "inherit", dir = ]] .. string.format("%q", cwd) .. [[,
            env = next(env) and env or nil } }
        local host, step = ex:submit(function()
          return procpool.current_worker().host, os.getenv("SLURM_STEP_ID")
        end):result(30)
        print(os.getenv("SLURM_JOB_NODELIST"), os.getenv("SLURM_JOB_CPUS_PER_NODE"), ex:_nworkers(),
          host, step ~= nil, ex:stats().hosts[1].host)
        ex:shutdown()
      ]])
      f:close()
      local p = io.popen("cd " .. cwd .. " && env SLURM_CONF=" .. cluster.conf ..
        " timeout 90 salloc -N1 --job-name=pp-alloc lua5.4 " .. script .. " 2>&1")
      local out = p:read("a")
      p:close()
      os.remove(script)
      local node, cpus, n, host, in_step, listed = out:match("([^\n\t]+)\t(%d+)\t(%d+)\t(%S+)\t(%a+)\t(%S+)\n")
      assert.is_truthy(node, out)
      assert.are.equal(cluster.node, node)
      assert.are.equal(cpus, n)
      assert.are.same({ cluster.node, "true", cluster.node }, { host, in_step, listed })
    end)
  end)
end)
