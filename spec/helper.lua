-- Shared helpers for the specs. Loaded with require "spec.helper".
local H = {}

--- The list {1, ..., n}.
function H.range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

--- This process's open file descriptors: fd number -> what it names
--- ("pipe:[123]", "/dev/null", ...). The listing's own pipe is left out by
--- name, both of its ends: popen may not yet have closed its copy of the
--- write end when the listing runs.
function H.fd_table()
  local t = {}
  local p = io.popen("own=$(readlink /proc/$$/fd/1); ls -l /proc/" .. H.pid() .. "/fd | grep -vF \"$own\"")
  for line in p:lines() do
    local fd, target = line:match("(%d+) %-> (.*)$")
    if fd then t[tonumber(fd)] = target end
  end
  p:close()
  return t
end

--- Count this process's open file descriptors (as H.fd_table lists them).
function H.fd_count()
  local n = 0
  for _ in pairs(H.fd_table()) do n = n + 1 end
  return n
end

--- What changed from fd table `before` to `after`, as text ("" if nothing).
function H.fd_diff(before, after)
  local out = {}
  for fd, target in pairs(after) do
    if before[fd] ~= target then out[#out + 1] = "new " .. fd .. " -> " .. target end
  end
  for fd, target in pairs(before) do
    if after[fd] ~= target then out[#out + 1] = "gone " .. fd .. " -> " .. target end
  end
  table.sort(out)
  return table.concat(out, "; ")
end

local pid
function H.pid()
  if not pid then
    local f = io.open("/proc/self/stat")
    pid = tonumber(f:read("*l"):match("^(%d+)"))
    f:close()
  end
  return pid
end

--- Pids of this process's children (zombies included), from /proc.
function H.children(of)
  of = of or H.pid()
  local kids = {}
  local f = io.open("/proc/" .. of .. "/task/" .. of .. "/children")
  if f then
    for p in f:read("*a"):gmatch("%d+") do kids[#kids + 1] = tonumber(p) end
    f:close()
  end
  return kids
end

--- State letter of a process ("Z" for a zombie), or nil if gone.
function H.proc_state(p)
  local f = io.open("/proc/" .. p .. "/stat")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s:match("%) (%a)")
end

--- Wait (polling) until fn() is true or `timeout` seconds pass.
function H.eventually(fn, timeout)
  local core = require "procpool.core"
  local deadline = core.monotonic and core.monotonic() + (timeout or 5) or os.time() + (timeout or 5)
  while true do
    if fn() then return true end
    local now = core.monotonic and core.monotonic() or os.time()
    if now > deadline then return false end
    if core.sleep then core.sleep(0.01) else os.execute("sleep 0.01") end
  end
end

--- The fd count once earlier tests are gone: no child left, and the same
-- count over 0.1 s (an engine an earlier test left running closes its
-- fds when its last task ends, not at once).
function H.settled_fd_count(timeout)
  local core = require "procpool.core"
  collectgarbage()
  collectgarbage()
  H.eventually(function() return #H.children() == 0 end, timeout)
  local n
  H.eventually(function()
    local a = H.fd_count()
    core.sleep(0.1)
    n = H.fd_count()
    return a == n
  end, timeout)
  return n
end

--- How many processes have a command line matching `pattern` (pgrep -f;
-- write one character in brackets, "[s]leep 3", so that the pgrep's own
-- shell does not match).
function H.count_procs(pattern)
  -- without the sanitizer runtime the sanitized runs preload
  local p = io.popen("env -u LD_PRELOAD pgrep -f '" .. pattern .. "'")
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end

--- Run a Lua snippet in a fresh lua5.4 process; returns ok, stdout, stderr.
-- `env`, if given, is a command prefix such as "env -u X Y=1".
function H.run_lua(code, timeout, env)
  local tmp = os.tmpname()
  local f = io.open(tmp, "w")
  f:write(code)
  f:close()
  local lua = os.getenv("PROCPOOL_LUA") or "lua5.4"
  local errf = tmp .. ".err"
  local p = io.popen(string.format("%s timeout %d %s %s 2>%s", env or "", timeout or 30, lua, tmp,
    errf))
  local out = p:read("*a")
  local ok, _, code_ = p:close()
  local ef = io.open(errf)
  local err = ef:read("*a")
  ef:close()
  os.remove(tmp)
  os.remove(errf)
  return ok, out, err, code_
end

--- Stop what an earlier run that was killed before its teardown left:
-- for each temp dir matching `glob` (a daemon spec's, "/tmp/pp-sshd.*"),
-- the processes of its NAME.pid files that are still the ones started
-- there (their command line names the dir), then the dir.
function H.stop_stale(glob, names)
  local p = io.popen("ls -d " .. glob .. " 2>/dev/null")
  for dir in p:lines() do
    for _, name in ipairs(names) do
      local f = io.open(dir .. "/" .. name .. ".pid")
      local daemon = f and f:read("*l")
      if f then f:close() end
      local c = daemon and daemon:match("^%d+$") and io.open("/proc/" .. daemon .. "/cmdline")
      local cmd = c and c:read("a") or ""
      if c then c:close() end
      if cmd:find(dir, 1, true) then os.execute("kill " .. daemon .. " 2>/dev/null") end
    end
    os.execute("rm -rf " .. dir)
  end
  p:close()
end

return H
