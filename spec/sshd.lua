-- A private sshd on 127.0.0.1 for the specs of workers on hosts: its own
-- keys, config and port in a temp dir (never the system's, never port
-- 22), started here and stopped by its pid. Two host aliases, pp-loop
-- and pp-loop2, both name it, for two hosts.
local S = {}

local function sh(cmd)
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

--- Why the loopback sshd cannot run here (nil if it can).
function S.unavailable()
  local f = io.open("/usr/sbin/sshd")
  if not f then return "no /usr/sbin/sshd (openssh-server)" end
  f:close()
  local p = io.popen("id -u")
  local uid = p:read("*l")
  p:close()
  if uid ~= "0" then return "not root (sshd's privilege separation needs it)" end
  return nil
end

--- Start it. Returns { dir, port, config (an ssh_config), ssh (the words
-- of an ssh command using it), stop() }, or nil and why.
function S.start()
  local why = S.unavailable()
  if why then return nil, why end
  require("spec.helper").stop_stale("/tmp/pp-sshd.*", { "sshd" })
  local p = io.popen("mktemp -d /tmp/pp-sshd.XXXXXX")
  local dir = p:read("*l")
  p:close()
  if not sh(string.format("ssh-keygen -q -t ed25519 -N '' -f %s/host_key && " ..
    "ssh-keygen -q -t ed25519 -N '' -f %s/client_key && cp %s/client_key.pub %s/authorized_keys",
    dir, dir, dir, dir)) then
    return nil, "ssh-keygen failed"
  end
  sh("mkdir -p /run/sshd")
  for attempt = 1, 5 do
    local port = 20000 + (os.time() * 7 + attempt * 131 + math.random(0, 9999)) % 20000
    local f = io.open(dir .. "/sshd_config", "w")
    f:write(table.concat({
      "Port " .. port, "ListenAddress 127.0.0.1", "HostKey " .. dir .. "/host_key",
      "PidFile " .. dir .. "/sshd.pid", "AuthorizedKeysFile " .. dir .. "/authorized_keys",
      "PermitRootLogin prohibit-password", "PasswordAuthentication no",
      "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
      "MaxStartups 100:30:200", "MaxSessions 64", "ClientAliveInterval 5",
      "ClientAliveCountMax 3", "LogLevel VERBOSE", "",
    }, "\n"))
    f:close()
    f = io.open(dir .. "/ssh_config", "w")
    f:write(table.concat({
      "Host pp-loop pp-loop2", "  HostName 127.0.0.1", "  Port " .. port, "  User root",
      "  IdentityFile " .. dir .. "/client_key", "  IdentitiesOnly yes",
      "  StrictHostKeyChecking no", "  UserKnownHostsFile " .. dir .. "/known_hosts",
      "  BatchMode yes", "  LogLevel ERROR", "",
    }, "\n"))
    f:close()
    if sh(string.format("env -u LD_PRELOAD /usr/sbin/sshd -f %s/sshd_config -E %s/sshd.log", dir, dir)) then
      local up = false
      for _ = 1, 50 do
        if sh(string.format("ssh -F %s/ssh_config pp-loop true 2>/dev/null", dir)) then
          up = true
          break
        end
        sh("sleep 0.1")
      end
      local s = { dir = dir, port = port, config = dir .. "/ssh_config" }
      s.ssh = { "ssh", "-F", s.config }
      function s.pid()
        local pf = io.open(dir .. "/sshd.pid")
        local pid = pf and pf:read("*l")
        if pf then pf:close() end
        return pid
      end
      function s.stop()
        local pid = s.pid()
        if pid then sh("kill " .. pid) end
        sh("rm -rf " .. dir)
      end
      if up then return s end
      s.stop()
      return nil, "sshd did not come up"
    end
  end
  sh("rm -rf " .. dir)
  return nil, "sshd could not start on a free port"
end

return S
