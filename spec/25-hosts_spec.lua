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
        host_timeout = 1 }
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
      assert.has_error(function() procpool.ProcessPoolExecutor { hosts = ":", output = "capture" } end,
        "output = \"capture\" is not available for workers on hosts")
      local ex <close> = quiet_pool { hosts = { "1/:" } }
      local ok, e = pcall(ex.submit_with, ex, { output = "capture" }, function() end)
      assert.is_false(ok)
      assert.matches("not available for workers on hosts", tostring(e))
      ok = pcall(function() for _ in ex:map(print, { 1 }, { output = "capture" }) do end end)
      assert.is_false(ok)
      assert.are.equal(2, ex:submit(function() return 2 end):result(T))
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
  end)
end)
