-- Workers on a host: the same workloads through a loopback ssh host (a
-- private sshd on 127.0.0.1, started here as the specs start it), through
-- the agent on this machine (":", the link without ssh), and on local
-- workers, with ratios; and GNU parallel -S on the same per-record job
-- beside `procpool map -S`. 2 workers everywhere. Needs root and sshd
-- (openssh-server); without them it says so and prints no table.
package.path = "./?.lua;" .. package.path
local procpool = require "procpool"
local B = require "bench.lib"
local sshd = require "spec.sshd"

local server, why = sshd.start()
if not server then
  print("## hosts (bench/hosts.lua): skipped: " .. why)
  return
end

local ssh = table.concat(server.ssh, " ")
local cwd = io.popen("pwd"):read("*l")
local remote = { lua_path = "inherit", lua_cpath = "inherit", dir = cwd }

local function noop(x) return x end
local N_PIPE, N_MAP, N_RT = 20000, 200000, 300

local function measure(ex)
  local r = {}
  ex:submit(noop, 1):result()
  -- round trip: one task at a time
  r.rt = B.best(function() for i = 1, N_RT do ex:submit(noop, i):result() end end, 3) / N_RT
  -- pipelined: submit all, then collect
  r.pipe = N_PIPE / B.best(function()
    local fs = {}
    for i = 1, N_PIPE do fs[i] = ex:submit(noop, i) end
    for i = 1, N_PIPE do fs[i]:result() end
  end, 3)
  local items = {}
  for i = 1, N_MAP do items[i] = i end
  r.map = N_MAP / B.best(function() for _ in ex:map(noop, items, { chunksize = 2000 }) do end end, 3)
  local big = string.rep("x", 64 << 20)
  r.echo = 64 / B.best(function() assert(#ex:submit(noop, big):result() == #big) end, 3)
  ex:shutdown()
  return r
end

local res = {
  ssh = measure(procpool.ProcessPoolExecutor { hosts = { "2/" .. ssh .. " pp-loop" }, remote = remote }),
  here = measure(procpool.ProcessPoolExecutor { hosts = { "2/:" } }),
  ["local"] = measure(procpool.ProcessPoolExecutor { max_workers = 2 }),
}

-- the per-record job, 200 lines (GNU parallel runs one ssh per record):
-- procpool map -S beside GNU parallel -S
local input = os.tmpname()
local f = io.open(input, "w")
for i = 1, 200 do f:write(i, "\n") end
f:close()
local script = os.tmpname() .. ".lua"
f = io.open(script, "w")
f:write("return function(line) return tostring(tonumber(line) * 2) end\n")
f:close()
local pp_cmd = string.format("bin/procpool map %s %s -S '2/%s pp-loop' --remote-path inherit >/dev/null",
  script, input, ssh)
local gp_cmd = string.format("parallel -S '2/%s pp-loop' --nonall true >/dev/null 2>&1; " ..
  "parallel -j 2 -S '2/%s pp-loop' 'echo $(({} * 2))' < %s >/dev/null 2>&1", ssh, ssh, input)
local function wall(cmd)
  return B.best(function() os.execute(cmd) end, 1)
end
local t_pp = wall(pp_cmd)
local has_parallel = os.execute("command -v parallel >/dev/null 2>&1")
local t_gp = has_parallel and wall(gp_cmd) or nil
-- the floor of the echo: ssh's own byte stream on this link, one way,
-- its connection set-up taken out (an echo moves its bytes each way)
local t_conn = B.best(function() os.execute(ssh .. " pp-loop true") end, 3)
local t_256 = B.best(function()
  os.execute("head -c 256M /dev/zero | " .. ssh .. " pp-loop 'cat > /dev/null'")
end, 3)
local stream = 256 / math.max(t_256 - t_conn, 1e-3) -- MiB/s, one way
local echo_floor = stream / 2
os.remove(input)
os.remove(script)
server.stop()

local function x(a, b) return a and b and string.format("%.2fx", a / b) or "n/a" end
local rows = {
  { "workload (2 workers)", "ssh host", "agent here (:)", "local workers", "ssh / local" },
  { "round trip", string.format("%.0f us", res.ssh.rt * 1e6), string.format("%.0f us", res.here.rt * 1e6),
    string.format("%.1f us", res["local"].rt * 1e6), x(res.ssh.rt, res["local"].rt) },
  { "20 000 pipelined tasks", B.fmt(res.ssh.pipe, "/s"), B.fmt(res.here.pipe, "/s"),
    B.fmt(res["local"].pipe, "/s"), x(res.ssh.pipe, res["local"].pipe) },
  { "map of 200 000, chunks of 2000", B.fmt(res.ssh.map, "/s"), B.fmt(res.here.map, "/s"),
    B.fmt(res["local"].map, "/s"), x(res.ssh.map, res["local"].map) },
  { "64 MiB echo", string.format("%.0f MiB/s", res.ssh.echo), string.format("%.0f MiB/s", res.here.echo),
    string.format("%.0f MiB/s", res["local"].echo), x(res.ssh.echo, res["local"].echo) },
  { "floor: ssh's stream, 64 MiB each way", string.format("%.0f MiB/s", echo_floor), "", "",
    "echo " .. x(res.ssh.echo, echo_floor) },
}
print("## workers on hosts (bench/hosts.lua), loopback sshd")
print()
B.table(rows)
print()
rows = {
  { "200 records, 2 workers on the ssh host", "procpool map -S", "GNU parallel -S", "ratio (time)" },
  { "whole command", string.format("%.2f s", t_pp), t_gp and string.format("%.2f s", t_gp) or "n/a",
    t_gp and string.format("%.2fx", t_pp / t_gp) or "n/a" },
}
B.table(rows)
