-- A private one-node Slurm for the specs of workers on hosts: munged,
-- slurmctld and slurmd with their own socket, config, state and ports in a
-- temp dir (never the system's), on 127.0.0.1, started here and stopped by
-- their pids.
local S = {}

local function sh(cmd)
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

local function read(cmd)
  local p = io.popen(cmd)
  local s = p:read("*l")
  p:close()
  return s
end

--- Why it cannot run here (nil if it can).
function S.unavailable()
  for _, f in ipairs({ "/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd",
    "/etc/munge/munge.key" }) do
    local h = io.open(f)
    if not h then return "no " .. f .. " (slurm-wlm, munge)" end
    h:close()
  end
  if read("id -u") ~= "0" then return "not root" end
  return nil
end

--- Start it. Returns { dir, conf (for SLURM_CONF), node, stop() }, or nil
-- and why.
function S.start()
  local why = S.unavailable()
  if why then return nil, why end
  require("spec.helper").stop_stale("/tmp/pp-slurm.*", { "slurmd", "slurmctld", "munged" })
  local dir = read("mktemp -d /tmp/pp-slurm.XXXXXX")
  sh("mkdir -p " .. dir .. "/state " .. dir .. "/spool " .. dir .. "/log && chmod 755 " .. dir ..
    " && chown munge:munge " .. dir)
  local s = { dir = dir, conf = dir .. "/slurm.conf", node = read("hostname -s") }
  local function pid(name)
    local f = io.open(dir .. "/" .. name .. ".pid")
    local p = f and f:read("*l")
    if f then f:close() end
    return p
  end
  function s.stop()
    for _, name in ipairs({ "slurmd", "slurmctld", "munged" }) do
      local p = pid(name)
      if p then sh("kill " .. p .. " 2>/dev/null") end
    end
    sh("sleep 0.5; rm -rf " .. dir)
  end
  if not sh(string.format("env -u LD_PRELOAD runuser -u munge -- /usr/sbin/munged --socket=%s/munge.sock " ..
    "--pid-file=%s/munged.pid --log-file=%s/munged.log --seed-file=%s/munged.seed", dir, dir, dir, dir)) then
    s.stop()
    return nil, "munged did not start"
  end
  local port = 26000 + (os.time() * 13 + math.random(0, 999)) % 2000 * 2
  local f = io.open(s.conf, "w")
  f:write(table.concat({
    "ClusterName=pp", "SlurmctldHost=" .. s.node .. "(127.0.0.1)", "SlurmctldPort=" .. port,
    "SlurmdPort=" .. (port + 1), "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
    "AuthInfo=socket=" .. dir .. "/munge.sock", "CredType=cred/munge", "MpiDefault=none",
    "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "ReturnToService=2",
    "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
    "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
    "JobAcctGatherType=jobacct_gather/none", "StateSaveLocation=" .. dir .. "/state",
    "SlurmdSpoolDir=" .. dir .. "/spool", "SlurmctldPidFile=" .. dir .. "/slurmctld.pid",
    "SlurmdPidFile=" .. dir .. "/slurmd.pid", "SlurmctldLogFile=" .. dir .. "/log/slurmctld.log",
    "SlurmdLogFile=" .. dir .. "/log/slurmd.log",
    "NodeName=" .. s.node .. " NodeAddr=127.0.0.1 CPUs=" .. read("nproc") .. " State=UNKNOWN",
    "PartitionName=debug Nodes=" .. s.node .. " Default=YES MaxTime=INFINITE State=UP", "",
  }, "\n"))
  f:close()
  -- (the daemons never run under a sanitized run's preloaded runtime)
  local env = "env -u LD_PRELOAD SLURM_CONF=" .. s.conf .. " "
  if not sh(env .. "/usr/sbin/slurmctld -f " .. s.conf) or not sh(env .. "/usr/sbin/slurmd -f " .. s.conf) then
    s.stop()
    return nil, "slurmctld or slurmd did not start"
  end
  for _ = 1, 100 do
    if sh(env .. "sinfo -h -o %T 2>/dev/null | grep -q idle") then return s end
    sh("sleep 0.1")
  end
  s.stop()
  return nil, "the node never became idle"
end

return S
