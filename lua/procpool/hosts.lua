--- procpool.hosts: where a pool's workers run when they run on hosts.
-- The `hosts` option in GNU parallel's sshlogin syntax, the launchers
-- (ssh, Slurm's srun, this machine, a user's function) and the command
-- that starts procpool's agent on each host (src/agent.c). The C side
-- (src/hostproxy.c) runs each launcher and speaks to the agent over its
-- stdin and stdout.
-- @module procpool.hosts
local M = {}

--- The agent's one line: it checks the interpreter and procpool there
-- first, and says what is missing on a line the proxy reads
-- (`\0PPERR what detail`), since a login's own output may come before.
M.PRELUDE = 'if _VERSION~="Lua 5.4" then io.write("\\0PPERR lua ",_VERSION,"\\n") os.exit(3) end '
  .. 'local ok,c=pcall(require,"procpool.core") if not ok then '
  .. 'io.write("\\0PPERR noprocpool ",(tostring(c):gsub("%s+"," ")),"\\n") os.exit(3) end '
  .. "c._agent()"

--- ssh's options for the link, always: no pty (the stream is binary),
-- no escape character, never a prompt, dead connections noticed.
M.SSH_OPTS = {
  "-T", "-e", "none", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5",
  "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=10",
}

--- A string as one word for a POSIX shell (ssh hands the remote command
-- to the login shell as one string).
function M.sh_quote(s)
  if s:match("^[%w%%+,./:=@_-]+$") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function words(s)
  local t = {}
  for w in s:gmatch("%S+") do t[#t + 1] = w end
  return t
end

--- One sshlogin: `[N/][sshcommand [options]] [user@]host`, or `:` (this
-- machine). Returns { name, workers (nil: the host's CPUs), host, ssh (the
-- words of the ssh command), here (true for `:`) }, or nil and why.
function M.parse_login(s)
  if type(s) ~= "string" then return nil, "an sshlogin must be a string, got " .. type(s) end
  local text = s:match("^%s*(.-)%s*$")
  if text:match("^@[^/%s]*/") then
    return nil, "sshlogin '" .. s .. "': groups ('@group/') are not supported"
  end
  local n, rest = text:match("^(%d+)/(.*)$")
  local workers
  if n then
    workers = tonumber(n)
    if workers < 1 then return nil, "sshlogin '" .. s .. "': the worker count must be at least 1" end
    text = rest
  end
  local w = words(text)
  if #w == 0 then return nil, "sshlogin '" .. s .. "' names no host" end
  local host = w[#w]
  if host == ":" then
    if #w > 1 then return nil, "sshlogin '" .. s .. "': ':' (this machine) takes no ssh command" end
    return { name = ":", workers = workers, host = ":", here = true }
  end
  local ssh = { "ssh" }
  if #w > 1 then
    ssh = {}
    for i = 1, #w - 1 do ssh[i] = w[i] end
  end
  return { name = host, workers = workers, host = host, ssh = ssh }
end

--- The table form: { host = "node3", workers = 2, ssh = { "ssh", "-p", "2222" } }.
local function table_login(t)
  if type(t.host) ~= "string" or t.host == "" then
    return nil, "a hosts entry table needs host (a string)"
  end
  if t.workers ~= nil and (math.type(t.workers) ~= "integer" or t.workers < 1) then
    return nil, "host '" .. t.host .. "': workers must be an integer >= 1"
  end
  if t.ssh ~= nil and (type(t.ssh) ~= "table" or #t.ssh == 0) then
    return nil, "host '" .. t.host .. "': ssh must be a list of words ({ \"ssh\", \"-p\", \"2222\" })"
  end
  for k in pairs(t) do
    if k ~= "host" and k ~= "workers" and k ~= "ssh" then
      return nil, "host '" .. t.host .. "': unknown field '" .. tostring(k) .. "'"
    end
  end
  if t.host == ":" then return { name = ":", workers = t.workers, host = ":", here = true } end
  local ssh = t.ssh or { "ssh" }
  local copy = {}
  for i = 1, #ssh do copy[i] = tostring(ssh[i]) end
  return { name = t.host, workers = t.workers, host = t.host, ssh = copy }
end

--- Split a comma-separated list of sshlogins (PROCPOOL_HOSTS, -S).
function M.split(s)
  local t = {}
  for part in (s .. ","):gmatch("([^,]*),") do
    part = part:match("^%s*(.-)%s*$")
    if part ~= "" then t[#t + 1] = part end
  end
  return t
end

--- The sshlogins of a file (GNU parallel's --slf): one per line, `#`
-- comments and blank lines skipped. Returns the list, or nil and why.
function M.read_file(path)
  local f, err = io.open(path)
  if not f then return nil, "cannot read the sshlogin file: " .. tostring(err) end
  local t = {}
  for line in f:lines() do
    line = line:gsub("#.*$", ""):match("^%s*(.-)%s*$")
    if line ~= "" then t[#t + 1] = line end
  end
  f:close()
  return t
end

--- The host list of the `hosts` option (a list of sshlogins and tables,
-- or one comma-separated string). Returns the entries, or nil and why.
function M.entries(hosts)
  if type(hosts) == "string" then hosts = M.split(hosts) end
  if type(hosts) ~= "table" then
    return nil, "hosts must be a list of sshlogins (\"4/node1\", \":\") or tables, got " .. type(hosts)
  end
  local out = {}
  for i, h in ipairs(hosts) do
    local e, why
    if type(h) == "table" then e, why = table_login(h) else e, why = M.parse_login(h) end
    if not e then return nil, why end
    out[i] = e
  end
  if #out == 0 then return nil, "hosts is empty" end
  return out
end

--- Slurm's hostlist syntax ("node[01-03,07],gpu5") as a list of names.
function M.expand_nodelist(s)
  local out = {}
  local i, n = 1, #s
  while i <= n do
    -- one item: up to a comma outside brackets
    local j, depth = i, 0
    while j <= n do
      local c = s:sub(j, j)
      if c == "[" then depth = depth + 1 elseif c == "]" then depth = depth - 1
      elseif c == "," and depth == 0 then break end
      j = j + 1
    end
    local item = s:sub(i, j - 1)
    local names = { "" }
    for text, ranges in item:gmatch("([^%[]*)%[?([^%]]*)%]?") do
      local nxt = {}
      for _, pre in ipairs(names) do
        if ranges == "" then
          nxt[#nxt + 1] = pre .. text
        else
          for r in ranges:gmatch("[^,]+") do
            local a, b = r:match("^(%d+)-(%d+)$")
            if a then
              for k = tonumber(a), tonumber(b) do
                nxt[#nxt + 1] = pre .. text .. string.format("%0" .. #a .. "d", k)
              end
            else
              nxt[#nxt + 1] = pre .. text .. r
            end
          end
        end
      end
      names = nxt
      if text == "" and ranges == "" then break end
    end
    for _, nm in ipairs(names) do if nm ~= "" then out[#out + 1] = nm end end
    i = j + 1
  end
  return out
end

--- Slurm's per-node CPU counts ("2(x3),1" for 2, 2, 2, 1).
function M.expand_counts(s)
  local out = {}
  for part in s:gmatch("[^,]+") do
    local c, rep = part:match("^(%d+)%(x(%d+)%)$")
    if c then
      for _ = 1, tonumber(rep) do out[#out + 1] = tonumber(c) end
    else
      out[#out + 1] = tonumber(part)
    end
  end
  return out
end

--- The hosts of the Slurm allocation this process runs in, with their
-- CPU counts; nil and why outside one.
function M.allocation()
  local list = os.getenv("SLURM_JOB_NODELIST") or os.getenv("SLURM_NODELIST")
  if not list then
    return nil, "launcher = \"slurm\" without hosts needs a Slurm allocation (no SLURM_JOB_NODELIST)"
  end
  local names = M.expand_nodelist(list)
  local counts = M.expand_counts(os.getenv("SLURM_JOB_CPUS_PER_NODE") or "")
  local out = {}
  for i, nm in ipairs(names) do out[i] = { name = nm, host = nm, workers = counts[i] } end
  return out
end

-- A search path with its relative templates made absolute (from the
-- current directory): the agent's working directory is not ours.
local function absolute(path)
  local p = io.popen("pwd")
  local cwd = p and p:read("*l")
  if p then p:close() end
  if not cwd then return path end
  local out = {}
  for t in (path .. ";"):gmatch("([^;]*);") do
    if t ~= "" and t:sub(1, 1) ~= "/" then t = cwd .. "/" .. t:gsub("^%./", "") end
    out[#out + 1] = t
  end
  return table.concat(out, ";")
end

--- The environment assignments for the agent: the search paths, as
-- `remote` asks ("inherit": ours), and remote.env.
local function agent_env(remote, here)
  local env = {}
  local lp, lcp = remote.lua_path, remote.lua_cpath
  if here or lp == "inherit" then lp = absolute(package.path) end
  if here or lcp == "inherit" then lcp = absolute(package.cpath) end
  if lp then env[#env + 1] = "LUA_PATH_5_4=" .. lp end
  if lcp then env[#env + 1] = "LUA_CPATH_5_4=" .. lcp end
  local keys = {}
  for k in pairs(remote.env or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do env[#env + 1] = k .. "=" .. tostring(remote.env[k]) end
  return env
end

--- The agent's command (a list of words) for entry e.
function M.agent_argv(e, remote)
  local argv = { "env" }
  for _, a in ipairs(agent_env(remote, e.here)) do argv[#argv + 1] = a end
  argv[#argv + 1] = remote.executable or "lua5.4"
  argv[#argv + 1] = "-e"
  argv[#argv + 1] = M.PRELUDE
  return argv
end

--- The same as one shell command (for ssh), with remote.dir.
function M.agent_command(e, remote)
  local q = {}
  for i, a in ipairs(M.agent_argv(e, remote)) do q[i] = M.sh_quote(a) end
  local cmd = "exec " .. table.concat(q, " ")
  if remote.dir then cmd = "cd " .. M.sh_quote(remote.dir) .. " && " .. cmd end
  return cmd
end

--- The launcher's command for entry e: `:` runs the agent here; "ssh"
-- runs it through the entry's ssh command; "slurm" through srun on the
-- node; a function is called as launcher(host, agent_argv, agent_command)
-- and returns the list of words to run.
function M.launch_argv(e, launcher, remote)
  if e.here then return M.agent_argv(e, remote) end
  if type(launcher) == "function" then
    local argv = launcher(e.host, M.agent_argv(e, remote), M.agent_command(e, remote))
    if type(argv) ~= "table" or #argv == 0 then
      error("the launcher function must return a list of words for host '" .. e.host .. "'", 0)
    end
    local copy = {}
    for i = 1, #argv do copy[i] = tostring(argv[i]) end
    return copy
  end
  if launcher == "slurm" then
    local argv = { "srun", "--nodes=1", "--ntasks=1", "--nodelist=" .. e.host, "--unbuffered",
      "--kill-on-bad-exit=1", "--job-name=procpool" }
    if os.getenv("SLURM_STEP_ID") then argv[#argv + 1] = "--overlap" end
    for _, a in ipairs(M.agent_argv(e, remote)) do argv[#argv + 1] = a end
    return argv
  end
  local argv = {}
  for _, w in ipairs(e.ssh) do argv[#argv + 1] = w end
  for _, o in ipairs(M.SSH_OPTS) do argv[#argv + 1] = o end
  argv[#argv + 1] = e.host
  argv[#argv + 1] = M.agent_command(e, remote)
  return argv
end

local REMOTE_OPTS = { executable = true, lua_path = true, lua_cpath = true, env = true, dir = true,
  ship_modules = true }

--- remote.ship_modules: { "name", ... } -> { [name] = { source, path } },
-- each found on this machine's package.path (pure-Lua modules only: a C
-- module must be installed on the hosts). Raises at `level`.
local function shipped(list, level)
  if list == nil then return nil end
  if type(list) ~= "table" then error("remote.ship_modules must be a list of module names", level + 1) end
  local out = {}
  for i, name in ipairs(list) do
    if type(name) ~= "string" or name == "" then
      error("remote.ship_modules[" .. i .. "] must be a module name", level + 1)
    end
    local path, why = package.searchpath(name, package.path)
    if not path then
      error("remote.ship_modules: no Lua source for module '" .. name .. "' on package.path" ..
        " (a C module must be installed on the hosts):" .. why, level + 1)
    end
    local f = assert(io.open(path, "rb"))
    local src = f:read("a")
    f:close()
    local ok, err = load(src, "@" .. path)
    if not ok then error("remote.ship_modules: module '" .. name .. "' does not load: " .. err, level + 1) end
    out[name] = { src, path }
  end
  return out
end

--- reconnect = { attempts = n, delay = seconds } | false -> attempts, delay
local function reconnect_of(r, level)
  if r == nil then return 3, 1 end
  if r == false then return 0, 1 end
  if type(r) ~= "table" then error("reconnect must be a table { attempts =, delay = } or false", level + 1) end
  for k in pairs(r) do
    if k ~= "attempts" and k ~= "delay" then
      error("unknown reconnect option '" .. tostring(k) .. "'", level + 1)
    end
  end
  local n, d = r.attempts, r.delay
  if n == nil then n = 3 end
  if d == nil then d = 1 end
  if math.type(n) ~= "integer" or n < 0 then error("reconnect.attempts must be an integer >= 0", level + 1) end
  if type(d) ~= "number" or not (d > 0) then -- luacheck: ignore 581 (NaN too)
    error("reconnect.delay must be a number of seconds > 0", level + 1)
  end
  return n, d
end

--- The host options of the C side's constructor, into `t` (from hosts_of).
function M.core_opts(t, list, o)
  t.hosts = list
  if o then
    t.host_timeout, t.start_timeout = o.host_timeout, o.start_timeout
    t.reconnects, t.reconnect_delay, t.ship_modules = o.reconnects, o.reconnect_delay, o.ship_modules
  end
  return t
end

--- The C side's hosts list for the constructor's options (checked here),
-- or nil when the pool runs on this machine only. Raises at `level`.
function M.hosts_of(opts, fname, level)
  local hosts = opts.hosts
  local launcher = opts.launcher
  if hosts == nil and launcher == "slurm" then
    local why
    hosts, why = M.allocation()
    if not hosts then error(why, level + 1) end
  end
  if hosts == nil then
    local env = os.getenv("PROCPOOL_HOSTS")
    if env and env ~= "" then hosts = env end
  end
  if hosts == nil then
    for _, k in ipairs({ "launcher", "host_timeout", "start_timeout", "remote", "workers_per_host",
      "reconnect" }) do
      if opts[k] ~= nil then error(k .. " is for pools with hosts", level + 1) end
    end
    return nil
  end
  local count = fname == "Pool" and "processes" or "max_workers"
  if opts[count] ~= nil then
    error("with hosts, give the count per host ('4/node1') or workers_per_host, not " .. count,
      level + 1)
  end
  if opts.context ~= nil or opts.executable ~= nil then
    error("with hosts, every worker starts in a fresh interpreter: no context or executable " ..
      "option (remote.executable names the interpreter on the hosts)", level + 1)
  end
  if launcher ~= nil and launcher ~= "ssh" and launcher ~= "slurm" and type(launcher) ~= "function" then
    error("launcher must be \"ssh\", \"slurm\" or a function(host, argv, command)", level + 1)
  end
  local wph = opts.workers_per_host
  if wph ~= nil and (math.type(wph) ~= "integer" or wph < 1) then
    error("workers_per_host must be an integer >= 1", level + 1)
  end
  local ht = opts.host_timeout
  if ht ~= nil and (type(ht) ~= "number" or not (ht > 0)) then -- luacheck: ignore 581 (NaN too)
    error("host_timeout must be a number of seconds > 0", level + 1)
  end
  local st = opts.start_timeout
  if st ~= nil and (type(st) ~= "number" or not (st > 0)) then -- luacheck: ignore 581 (NaN too)
    error("start_timeout must be a number of seconds > 0", level + 1)
  end
  local remote = opts.remote or {}
  if type(remote) ~= "table" then error("remote must be a table", level + 1) end
  for k in pairs(remote) do
    if not REMOTE_OPTS[k] then error("unknown remote option '" .. tostring(k) .. "'", level + 1) end
  end
  local entries, why
  if type(hosts) == "table" and hosts[1] and type(hosts[1]) == "table" and hosts[1].name then
    entries = hosts -- (the allocation's)
  else
    entries, why = M.entries(hosts)
    if not entries then error(why, level + 1) end
  end
  local out = {}
  for i, e in ipairs(entries) do
    local ok, argv = pcall(M.launch_argv, e, launcher, remote)
    if not ok then error(argv, level + 1) end
    out[i] = { name = e.name, argv = argv, workers = e.workers or wph,
      exe = remote.executable or "lua5.4" }
  end
  local attempts, delay = reconnect_of(opts.reconnect, level + 1)
  return out, { host_timeout = ht, start_timeout = st, reconnects = attempts, reconnect_delay = delay,
    ship_modules = shipped(remote.ship_modules, level + 1) }
end

return M
