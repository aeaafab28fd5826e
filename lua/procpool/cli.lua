--- procpool.cli: the `procpool` command (bin/procpool is its launcher).
--
--     procpool map SCRIPT.lua [INPUT ...] [options]
--
-- Runs a Lua function over lines of text in a pool of worker processes.
-- The records (lines) go through the library's chunk pipeline
-- (procpool.map), so input of any size runs in flat memory, and results
-- stream out as they come. `procpool --help` and `procpool map --help`
-- describe the command line; the notes below describe how it is built.
--
-- * `parse(argv)` turns the arguments into options, or into the message
--   of a usage error; it never exits, so it is testable alone.
--   `main(argv)` runs the command and returns its exit status.
-- * The script is loaded in this process before the pool is created. Fork
--   workers start as copies of this process, so the script table is
--   already in every worker (as `package.loaded["procpool.cli.script"]`):
--   the task sent to the workers is a small wrapper that looks it up there
--   and calls `map`. Upvalues of the script's functions never have to be
--   serialized.
-- * Standard input is read without ever waiting while there is something
--   else to do (one read(2) of what is there when it is readable); when
--   there is nothing to do, procpool waits for input and results together
--   (the executor's fd and fd 0). Records go out in chunks, a chunk as
--   soon as the input has nothing more for now, and at the end of each
--   input, so that a chunk's records come from one input (its tag); the
--   records ahead of the output are bounded, so memory stays flat.
-- * Output is flushed whenever procpool is about to wait.
-- * Workers ignore Ctrl-C; lua5.4 turns it into an error here, and
--   procpool stops the workers and exits with status 130.
-- @module procpool.cli

-- The library is loaded when needed: --help works without it.

local M = {}

local SCRIPT_MODULE = "procpool.cli.script" -- where workers find the script
local ERRKEY = "\0procpool.cli.error" -- marks a failed record's result
local BLOCK = 65536 -- bytes read at a time from a pipe
local MAX_CHUNK = 512 -- upper bound of the automatic chunksize
local CHUNK_NS = 5000000 -- nanoseconds of work per chunk (automatic chunksize)

M.USAGE = [[
Usage: procpool map SCRIPT.lua [INPUT ...] [options]
       procpool --help | --version

Run SCRIPT's map function on every line of the INPUT files (standard input
when there is none, or for "-") in a pool of worker processes, and write
the results.

SCRIPT.lua returns a function (the map function), or a table:
  { map = fn, init = fn?, reduce = fn?, finish = fn? }
  map(record)         runs in a worker for each record (a line, without
                      its newline; with --json, the decoded value)
  init()              runs once in each worker, before its first record
  reduce(acc, value)  runs in procpool's own process for each non-nil
                      result of map (in input order, or as they complete
                      with --unordered) and returns the new acc; acc
                      starts as nil
  finish(acc)         runs once at the end, in procpool's own process

Output: each non-nil result of map is written as one line: a string as it
is (one with newlines writes several lines), a number or a boolean with
tostring; a table needs --json. map returns its result: it must not print
it (the workers share procpool's standard output).
With reduce, results go to reduce (as values: anything procpool can send
between processes, which excludes cjson.null) and are not written. At the
end, the final value, finish(acc) (or acc when there is no finish), is
written: nil writes nothing; an array (a table whose keys are exactly
1..n) writes one line per element; any other value is written as one
result, so with --json a table is one JSON value (return { list } to
write a list as one JSON array).

Options:
  -j, --jobs N         worker processes (default: the number of CPUs); with
                       -S, per host for hosts given without N/
  -S, --sshlogin L     run workers on host L, GNU parallel's sshlogin:
                       N/user@host (N workers), 'ssh -p 2222 host' (the
                       last word is the host), ':' (this machine); repeat
                       it or separate logins with commas;
                       the script is sent to every host, where procpool
                       and the modules it requires must be installed
      --slf FILE       the sshlogins of FILE (one per line, # comments)
      --ssh CMD        the ssh command for logins that give none
      --launcher L     ssh (default) or slurm (srun on each node; without -S,
                       the nodes of the allocation)
      --remote-lua EXE the interpreter on the hosts (default: lua5.4)
      --remote-path inherit
                       the hosts find procpool with this process's search
                       paths (for a shared filesystem)
      --host-timeout S seconds of silence after which a host is lost
      --ship-module M  send pure-Lua module M (found on this machine's
                       package.path) to the hosts, for scripts that require
                       a module the hosts do not have; repeat it for more
      --json           each line is a JSON value, decoded (lua-cjson) before
                       map; results are JSON-encoded, one per line; blank
                       lines are skipped
      --unordered      write results as they complete, not in input order
      --group          capture what each record's map writes to stdout and
                       stderr (its own prints, and the commands it runs)
                       and write it together, never interleaved with
                       another record's, just before the record's result
      --chunksize K    records sent to a worker at a time (default: auto:
                       1 at first, then sized from the observed speed to
                       about 5 ms of work per chunk, at most 512, so slow
                       records spread over all workers and fast ones are
                       batched); results of a chunk come back together
      --timeout S      time limit for each record, in seconds; a record
                       that runs longer is stopped (its worker is replaced)
                       and reported as failed (procpool.DeadlineExceeded)
      --memory SIZE    memory each worker may allocate (bytes, or 512M, 2G);
                       a record that runs out fails with
                       procpool.MemoryError and its worker is replaced
      --cpu-limit S    CPU seconds each record may use (whole seconds); a
                       record past it fails (procpool.WorkerLost, reason
                       "CPU time limit ...") and its worker is replaced
      --nice N         run the workers N levels nicer (0-19)
      --progress       draw a progress line on stderr, if it is a terminal
      --no-progress    never draw it (default: drawn when stderr is a
                       terminal and the output is not)
  -o, --output OUT     write the results to the file OUT
  -h, --help           show this help
      --version        show procpool's version

Input is read lazily with bounded buffering and results are written as
they arrive, so output begins before the input ends and memory stays flat
on inputs of any length.

A record whose map raises (or whose JSON is malformed, or which runs past
--timeout) is reported on stderr with its line number (and file name when
there are several inputs); the run goes on. Exit status: 0 when every
record succeeded, 1 when any failed (the count is reported), 2 for bad
usage or a bad script (nothing is run then), 130 after Ctrl-C (the
workers are stopped).

Example:
  procpool map examples/wordfreq.lua book.txt -j 4
]]

local HINT = "Try 'procpool map --help' for more information.\n"

---------------------------------------------------------------------------
-- messages and errors

local stderr = io.stderr
local progress_shown = false -- a progress line is on the terminal

local function say(msg)
  if progress_shown then
    stderr:write("\r\27[K")
    progress_shown = false
  end
  stderr:write("procpool: ", msg, "\n")
end

--- Whether an error is lua5.4's Ctrl-C: "interrupted!", perhaps after a
-- position, raised by its SIGINT hook at the next call or line, wherever
-- that is. The rule of the library's core.is_interrupt (src/error.c),
-- here too because Ctrl-C may come before the library is loaded. A
-- protected call here raises it again, or Ctrl-C would be lost.
local function is_interrupt(err)
  return type(err) == "string" and (err == "interrupted!" or err:sub(-14) == ": interrupted!")
end

-- Bad usage or a bad script (before any work): main reports the message,
-- with the hint to --help unless `hint` is false, and exits 2.
local Usage = {}

local function usage_error(msg, hint)
  error(setmetatable({ msg = msg, hint = hint ~= false }, Usage), 0)
end

---------------------------------------------------------------------------
-- command line

local function parse_number(opt, s, integer)
  local n = tonumber(s)
  if n == nil or n ~= n or n <= 0 or (integer and math.type(n) ~= "integer") then
    usage_error(string.format("option %s: expected a %s > 0, got '%s'", opt,
      integer and "whole number" or "number", tostring(s)))
  end
  return n
end

-- the arguments after `map`
local function parse_map_args(args)
  local o = { command = "map" }
  local positional = {}
  local help = false
  local i, only_positional = 1, false
  while i <= #args do
    local a = args[i]
    if only_positional or a == "-" or a:sub(1, 1) ~= "-" then
      positional[#positional + 1] = a
    elseif a == "--" then
      only_positional = true
    else
      local name, inline = a:match("^(%-%-[^=]+)=(.*)$")
      if not name then
        name = a
        if a:match("^%-[joS].") then -- -j4, -oFILE, -S:
          name, inline = a:sub(1, 2), a:sub(3)
        end
      end
      local function value()
        if inline then return inline end
        i = i + 1
        if args[i] == nil then usage_error("option " .. name .. " needs a value") end
        return args[i]
      end
      local function flag()
        if inline then usage_error("option " .. name .. " takes no value") end
        return true
      end
      if name == "-h" or name == "--help" then
        help = flag()
      elseif name == "-S" or name == "--sshlogin" then
        o.hosts = o.hosts or {}
        for _, l in ipairs(require("procpool.hosts").split(value())) do o.hosts[#o.hosts + 1] = l end
      elseif name == "--slf" or name == "--sshloginfile" then
        local list, why = require("procpool.hosts").read_file(value())
        if not list then usage_error("option " .. name .. ": " .. why) end
        o.hosts = o.hosts or {}
        for _, l in ipairs(list) do o.hosts[#o.hosts + 1] = l end
      elseif name == "--ssh" then
        o.ssh = value()
        if not o.ssh:find("%S") then usage_error("option --ssh: empty command") end
      elseif name == "--launcher" then
        o.launcher = value()
        if o.launcher ~= "ssh" and o.launcher ~= "slurm" then
          usage_error("option --launcher: expected ssh or slurm, got '" .. o.launcher .. "'")
        end
      elseif name == "--remote-lua" then
        o.remote_lua = value()
      elseif name == "--remote-path" then
        local v = value()
        if v ~= "inherit" then usage_error("option --remote-path: only 'inherit' is known, got '" .. v .. "'") end
        o.remote_path = v
      elseif name == "--host-timeout" then
        o.host_timeout = parse_number(name, value(), false)
      elseif name == "--ship-module" then
        o.ship_module = o.ship_module or {}
        o.ship_module[#o.ship_module + 1] = value()
      elseif name == "-j" or name == "--jobs" then
        o.jobs = parse_number(name, value(), true)
      elseif name == "--json" then
        o.json = flag()
      elseif name == "--unordered" then
        o.unordered = flag()
      elseif name == "--group" then
        o.group = flag()
      elseif name == "--chunksize" then
        o.chunksize = parse_number(name, value(), true)
      elseif name == "--timeout" then
        o.timeout = parse_number(name, value(), false)
      elseif name == "--memory" then
        local v = value()
        local n, why = require("procpool.check").size_of(v)
        if not n or n < 1024 * 1024 then
          usage_error("option --memory: " .. (why or ("'" .. v .. "' is under 1M")))
        end
        o.memory = n
      elseif name == "--cpu-limit" then
        o.cpu_limit = parse_number(name, value(), true)
      elseif name == "--nice" then
        local v = value()
        local n = math.tointeger(tonumber(v))
        if not n or n < 0 or n > 19 then
          usage_error("option --nice: expected a whole number from 0 to 19, got '" .. v .. "'")
        end
        o.nice = n
      elseif name == "--progress" then
        o.progress = flag()
      elseif name == "--no-progress" then
        flag()
        o.progress = false
      elseif name == "-o" or name == "--output" then
        o.output = value()
        if o.output == "" then usage_error("option " .. name .. ": empty file name") end
      else
        usage_error("unknown option '" .. a .. "'")
      end
    end
    i = i + 1
  end
  if help then return { command = "help" } end
  o.script = table.remove(positional, 1)
  if not o.script then usage_error("missing SCRIPT (procpool map SCRIPT.lua [INPUT ...])") end
  o.inputs = positional
  if #o.inputs == 0 then o.inputs[1] = "-" end
  if o.hosts and #o.hosts == 0 then usage_error("option -S/--slf: no sshlogin given") end
  if not o.hosts and o.launcher ~= "slurm" then
    for _, k in ipairs({ "ssh", "remote_lua", "remote_path", "host_timeout", "ship_module" }) do
      if o[k] then usage_error("option --" .. k:gsub("_", "-") .. " is for workers on hosts (-S)") end
    end
  end
  return o
end

local function parse(argv)
  local cmd = argv[1]
  if cmd == nil then return { command = "usage" } end
  if cmd == "-h" or cmd == "--help" or cmd == "help" then return { command = "help" } end
  if cmd == "--version" then return { command = "version" } end
  if cmd == "map" then return parse_map_args({ table.unpack(argv, 2, #argv) }) end
  usage_error(cmd:sub(1, 1) == "-" and ("unknown option '" .. cmd .. "'")
    or ("unknown command '" .. cmd .. "' (the command is 'map')"))
end

--- Parse the command line `argv` (the arguments, as `arg[1..n]`). Returns
-- the options, a table whose `command` is "map", "help" (--help, also
-- after `map`), "version" or "usage" (no argument: the usage goes to
-- stderr, status 2); for "map": `script`, `inputs` (a list, `{ "-" }`
-- when none is given) and, when given, `jobs`, `json`, `unordered`,
-- `chunksize`, `timeout`, `memory` (bytes), `cpu_limit`, `nice`,
-- `progress` (true, or false for --no-progress) and `output`. For bad usage: nil and the message.
function M.parse(argv)
  local ok, o = pcall(parse, argv)
  if ok then return o end
  if getmetatable(o) == Usage then return nil, o.msg end
  error(o, 0)
end

---------------------------------------------------------------------------
-- the script

local SCRIPT_FIELDS = { map = true, init = true, reduce = true, finish = true }

--- Load and check SCRIPT in this process (a usage error if it is unusable).
local function load_script(path)
  local chunk, err = loadfile(path)
  if not chunk then usage_error("cannot load script: " .. tostring(err), false) end
  local interrupted = false
  local ok, ret = xpcall(chunk, function(e)
    -- Ctrl-C while the script runs goes on as Ctrl-C
    interrupted = is_interrupt(e)
    if interrupted then return e end
    -- the script's own frames only
    local tb = debug.traceback(tostring(e), 2)
    return (tb:gsub("\n%s*%[C%]: in function 'xpcall'.*$", ""))
  end)
  if interrupted then error(ret, 0) end
  if not ok then usage_error("script " .. path .. " failed: " .. tostring(ret), false) end
  if type(ret) == "function" then return { map = ret } end
  if type(ret) ~= "table" then
    usage_error(string.format("script %s must return a function or a table "
      .. "{ map = fn, init = fn?, reduce = fn?, finish = fn? }, not a %s", path, type(ret)), false)
  end
  for k, v in pairs(ret) do
    if not SCRIPT_FIELDS[k] then
      usage_error(string.format("script %s: unknown field '%s' in the returned table "
        .. "(expected map, init, reduce, finish)", path, tostring(k)), false)
    end
    if type(v) ~= "function" then
      usage_error(string.format("script %s: field '%s' must be a function, not a %s", path, k,
        type(v)), false)
    end
  end
  if not ret.map then usage_error("script " .. path .. " has no map function", false) end
  return ret
end

--- The task run in the workers for each record. It finds the script where
-- the fork put it (or loads it, in a worker that does not have it), and
-- never raises for the record's own errors: it returns { [ERRKEY] = msg }
-- instead, so that every failure is known with its record.
local function make_task(path, json, keep_values)
  local name, errkey = SCRIPT_MODULE, ERRKEY
  return function(line)
    local S = package.loaded[name]
    if not S then
      S = dofile(path)
      if type(S) == "function" then S = { map = S } end
      package.loaded[name] = S
    end
    local record = line
    if json then
      if not line:find("%S") then return nil end
      local ok, v = pcall(require("cjson").decode, line)
      if not ok then return { [errkey] = "invalid JSON: " .. tostring(v) } end
      record = v
    end
    local ok, r = pcall(S.map, record)
    if not ok then
      -- out of memory goes on as it is: the worker then fails the record
      -- with a MemoryError and is replaced (see limits.memory)
      if r == "not enough memory" then error(r, 0) end
      return { [errkey] = tostring(r) }
    end
    if r == nil or keep_values then return r end
    if json then
      local okj, s = pcall(require("cjson").encode, r)
      if not okj then return { [errkey] = "cannot encode the result as JSON: " .. tostring(s) } end
      return s
    end
    local t = type(r)
    if t == "string" then return r end
    if t == "number" or t == "boolean" then return tostring(r) end
    return { [errkey] = "map returned a " .. t
      .. " (a line is a string, number or boolean; use --json for tables)" }
  end
end

--- The pool's initializer: the script's init, in each worker. For
-- workers on hosts, `src` is the script's text (it is not on the host):
-- each worker loads it first.
local function make_init(path, src, has_init)
  local name = SCRIPT_MODULE
  return function()
    local S = package.loaded[name]
    if not S then
      if src then
        S = assert(load(src, "@" .. path))()
      else
        S = dofile(path)
      end
      if type(S) == "function" then S = { map = S } end
      package.loaded[name] = S
    end
    if has_init then S.init() end
  end
end

---------------------------------------------------------------------------
-- input sources

--- One input: a file read line by line, or standard input ("-", or a
-- /dev/stdin path) read without ever waiting. `src.next()` is a source of
-- the map pipeline: true and a line, false when no complete line is there
-- yet (standard input only), or nil at the end. Pipes and terminals are
-- read with one read(2) of what is available at a time, so procpool only
-- waits for input when it has nothing else to do (and then waits for
-- input and results together, on `src.fd`). `src.bytes()`: the bytes
-- read so far, of a file.
local STDIN_PATHS = { ["-"] = true, ["/dev/stdin"] = true, ["/dev/fd/0"] = true,
  ["/proc/self/fd/0"] = true }

local find, sub = string.find, string.sub

local function open_source(path, core)
  local src = { name = path == "-" and "(standard input)" or path }
  if STDIN_PATHS[path] then
    local read, fd = core.read, 0
    local buf, pos, eof = "", 1, false
    src.fd = fd
    function src.next()
      while true do
        local e = find(buf, "\n", pos, true)
        if e then
          local line = sub(buf, pos, e - 1)
          pos = e + 1
          return true, line
        end
        if eof then
          if pos <= #buf then -- a last line without its newline
            local line = sub(buf, pos)
            buf, pos = "", 1
            return true, line
          end
          return nil
        end
        local data = read(fd, BLOCK)
        if data == nil then
          eof = true
        elseif data == "" then
          return false
        else
          buf = sub(buf, pos) .. data
          pos = 1
        end
      end
    end
    function src.bytes() return 0 end
    return src
  end
  local f, err = io.open(path, "rb")
  if not f then usage_error("cannot open input: " .. tostring(err), false) end
  local size = f:seek("end")
  if size then
    f:seek("set")
    src.size = size
  end
  src.file = f
  local bytes = 0
  function src.next()
    local line = f:read("l")
    if line == nil then
      f:close()
      src.file = nil
      return nil
    end
    bytes = bytes + #line + 1
    return true, line
  end
  function src.bytes() return bytes end
  return src
end

---------------------------------------------------------------------------
-- output and progress

--- Write a final value (from finish/reduce): arrays element by element.
local function final_records(v)
  if type(v) ~= "table" then return { v, n = 1 } end
  local n, count = #v, 0
  for _ in pairs(v) do count = count + 1 end
  if count == n then return v end
  return { v, n = 1 }
end

local function is_tty(fd)
  local core = require "procpool.core"
  if core.isatty then return core.isatty(fd) == true end
  return os.execute("test -t " .. fd) == true
end

--- A progress line on stderr: records done, rate, time; and the share
-- of the input read, with an ETA, when the input's size is known.
local function new_progress(now)
  local t0, last = now(), -1
  local p = { failed = 0 }
  function p.draw(count, final, frac)
    local t = now()
    if not final and t - last < 0.1 then return end
    last = t
    local el = t - t0
    local line = string.format("\r%d records, %.0f/s, %.1fs", count, el > 0 and count / el or 0, el)
    if frac then
      local eta = frac > 0 and el * (1 - frac) / frac or 0
      line = string.format("\r[%-20s] %3d%% %d records, %.0f/s, ETA %ds",
        ("#"):rep(math.floor(frac * 20)), math.floor(frac * 100), count,
        el > 0 and count / el or 0, math.ceil(eta))
    end
    stderr:write(line, p.failed > 0 and (", " .. p.failed .. " failed") or "", "\27[K")
    progress_shown = true
    if final then
      stderr:write("\n")
      progress_shown = false
    end
  end
  return p
end

---------------------------------------------------------------------------
-- procpool map

--- The library (a usage error if it cannot be loaded).
local function load_library()
  local ok, lib = pcall(require, "procpool")
  if not ok and is_interrupt(lib) then error(lib, 0) end
  if not ok then usage_error("cannot load the procpool library: " .. tostring(lib), false) end
  return lib
end

--- Run `procpool map` with the options `o` of `parse`; returns the exit
-- status.
local function run_map(o)
  local procpool = load_library()
  local core = require "procpool.core"
  local map = require "procpool.map"
  local cjson
  if o.json then
    local ok, mod = pcall(require, "cjson")
    if not ok and is_interrupt(mod) then error(mod, 0) end
    if not ok then usage_error("--json needs lua-cjson (require \"cjson\" failed)", false) end
    cjson = mod
  end
  local S = load_script(o.script)
  local sources, total_bytes = {}, 0
  for i, path in ipairs(o.inputs) do
    sources[i] = open_source(path, core)
    total_bytes = sources[i].size and total_bytes and total_bytes + sources[i].size or nil
  end
  local out = io.stdout
  if o.output then
    local err
    out, err = io.open(o.output, "wb")
    if not out then usage_error("cannot open output: " .. tostring(err), false) end
  end
  local out_tty = o.output == nil and is_tty(1)
  out:setvbuf(out_tty and "line" or "full", 65536)
  local show_progress = o.progress
  if show_progress == nil then show_progress = not out_tty and is_tty(2)
  elseif show_progress then show_progress = is_tty(2) end
  local clear_progress = show_progress and out_tty

  -- the script, where the workers (forked from this process) find it
  package.loaded[SCRIPT_MODULE] = S
  local limits
  if o.memory or o.cpu_limit or o.nice then
    limits = { memory = o.memory, cpu = o.cpu_limit, nice = o.nice }
  end
  local ex
  if o.hosts or o.launcher then
    local f = assert(io.open(o.script, "rb"))
    local src = f:read("a")
    f:close()
    local list = o.hosts
    if list and o.ssh then -- --ssh: the command of the logins that give none
      local H = require("procpool.hosts")
      for k, l in ipairs(list) do
        local e = H.parse_login(l)
        if e and not e.here and #e.ssh == 1 and e.ssh[1] == "ssh" and not l:find("%s") then
          list[k] = (e.workers and (e.workers .. "/") or "") .. o.ssh .. " " .. e.host
        end
      end
    end
    local remote = { executable = o.remote_lua, ship_modules = o.ship_module }
    if o.remote_path then remote.lua_path, remote.lua_cpath = "inherit", "inherit" end
    local ok, r = pcall(procpool.ProcessPoolExecutor, {
      hosts = list, launcher = o.launcher, workers_per_host = o.jobs, remote = remote,
      host_timeout = o.host_timeout, initializer = make_init(o.script, src, S.init ~= nil),
      limits = limits, output = o.group and "capture" or nil,
    })
    if not ok and is_interrupt(r) then error(r, 0) end
    if not ok then usage_error(tostring(r), false) end
    ex = r
  else
    ex = procpool.ProcessPoolExecutor {
      max_workers = o.jobs or procpool.cpu_count(),
      initializer = S.init and make_init(o.script, nil, true) or nil,
      limits = limits,
      output = o.group and "capture" or nil,
    }
  end
  local task = make_task(o.script, o.json, S.reduce ~= nil)
  -- chunks of consecutive lines of one input, sized from the observed
  -- time per line (or --chunksize), a bounded number ahead of the output
  local pipe = map.pipeline(ex, task, {
    task_timeout = o.timeout, chunksize = o.chunksize, chunk_ns = CHUNK_NS,
    max_chunk = MAX_CHUNK, unordered = o.unordered, capture = o.group == true,
  })
  local progress = show_progress and new_progress(core.monotonic)
  local several = #sources > 1
  local total, failed, errors = 0, 0, 0 -- records read, failed; other errors
  local acc

  local function write(str)
    local ok, err = out:write(str, "\n")
    if not ok then error({ fatal = "cannot write the output: " .. tostring(err) }, 0) end
  end

  local function report(src, line, msg)
    failed = failed + 1
    if progress then progress.failed = failed end
    if several then
      say(string.format("%s: line %d: %s", src.name, line, msg))
    else
      say(string.format("line %d: %s", line, msg))
    end
  end

  -- --group: a record's captured output, before its result
  local function write_group(out_s, err_s)
    if out_s == "" and err_s == "" then return end
    if progress_shown then
      stderr:write("\r\27[K")
      progress_shown = false
    end
    if out_s ~= "" then
      io.stdout:write(out_s)
      if err_s ~= "" then io.stdout:flush() end
    end
    if err_s ~= "" then stderr:write(err_s) end
  end

  local function handle(value, src, line)
    if type(value) == "table" and rawget(value, ERRKEY) then
      report(src, line, value[ERRKEY])
    elseif S.reduce then
      if value ~= nil then
        local ok, r = pcall(S.reduce, acc, value)
        if ok then
          acc = r
        elseif is_interrupt(r) then
          error(r, 0)
        else
          report(src, line, "reduce: " .. tostring(r))
        end
      end
    elseif value ~= nil then
      if clear_progress and progress_shown then
        stderr:write("\r\27[K")
        progress_shown = false
      end
      write(value)
    end
  end

  -- Each input is a source of the pipeline in turn; its chunks carry it
  -- as their tag, and `src.start` counts the records before it, so a
  -- record's line is its input index less that.
  local si, input_done = 1, false
  local done_records = 0
  sources[1].start = 0

  -- take input while there is room ahead; returns true if it took any,
  -- and whether the input would block
  local function take_input()
    local took = false
    while not input_done do
      local src = sources[si]
      local n, why, err = pipe.fill(src.next, src)
      total = total + n
      if n > 0 then took = true end
      if why == "ended" then
        si = si + 1
        if si > #sources then input_done = true else sources[si].start = total end
      elseif why == "failed" then
        error(err, 0)
      else
        return took, why == "blocked"
      end
    end
    return took, false
  end

  -- hand out what is done: in input order, or as it completes
  local function take_results()
    local any = false
    while true do
      local base, n, values, failures, src, outputs = pipe.take()
      if not base then return any end
      any = true
      local line0 = base - src.start
      for k = 1, n do
        local o_k = outputs and outputs[k]
        if o_k and o_k[1] then write_group(o_k[1], o_k[2]) end
        local f = failures and failures[k]
        if f then
          local e = f[1]
          if procpool.is_error(e, "BrokenProcessPool") then
            error({ fatal = "the worker pool broke: " .. tostring(e) }, 0)
          end
          report(src, line0 + k, tostring(e))
        else
          handle(values[k], src, line0 + k)
        end
      end
      done_records = done_records + n
    end
  end

  local function bytes_done()
    if not total_bytes or total_bytes == 0 then return nil end
    local b = 0
    for _, src in ipairs(sources) do b = b + src.bytes() end
    return b / total_bytes
  end

  local function main()
    while true do
      local took, blocked = take_input()
      local emitted = take_results()
      if progress then progress.draw(done_records, false, bytes_done()) end
      if input_done and pipe.pending() == 0 then break end
      if not took and not emitted then
        -- nothing to do for now: send what is written, then wait for
        -- results, and for input if there is room for more
        out:flush()
        local fds = { ex:pollfd() }
        if blocked and not input_done then fds[2] = sources[si].fd end
        core.poll(fds, progress and 0.1 or nil)
        ex:poll(0)
      end
    end
    if progress then progress.draw(done_records, true, bytes_done()) end
    if S.finish or S.reduce then
      local v = acc
      if S.finish then
        local ok, r = pcall(S.finish, acc)
        if not ok and is_interrupt(r) then error(r, 0) end
        if not ok then
          say("finish: " .. tostring(r))
          errors = errors + 1
          v = nil
        else
          v = r
        end
      end
      if v ~= nil then
        local list = final_records(v)
        for k = 1, list.n or #list do
          local x = list[k]
          local str
          if cjson then
            local ok, r = pcall(cjson.encode, x)
            if not ok and is_interrupt(r) then error(r, 0) end
            if ok then str = r else say("cannot encode the final value as JSON: " .. tostring(r)) end
          elseif type(x) == "string" or type(x) == "number" or type(x) == "boolean" then
            str = tostring(x)
          elseif x ~= nil then
            say("the final value is a " .. type(x) .. " (a line is a string, number or "
              .. "boolean; use --json for tables)")
          end
          if str then write(str) else errors = errors + 1 end
        end
      end
    end
  end

  local ok, err = pcall(main)
  if progress_shown then
    stderr:write("\n")
    progress_shown = false
  end
  local fatal, interrupted
  if not ok then
    interrupted = is_interrupt(err)
    fatal = interrupted and "interrupted" or type(err) == "table" and err.fatal or tostring(err)
    ex:kill_workers()
  else
    ex:shutdown()
  end
  for _, src in ipairs(sources) do
    if src.file then src.file:close() end
  end
  local okf, ferr = out:flush()
  if out ~= io.stdout then
    local okc, cerr = out:close()
    okf, ferr = okf and okc, ferr or cerr
  end
  if not okf then fatal = fatal or ("cannot write the output: " .. tostring(ferr)) end
  if fatal then
    say(fatal)
    return interrupted and 130 or 1
  end
  if failed > 0 then say(string.format("%d of %d records failed", failed, total)) end
  if failed > 0 or errors > 0 then return 1 end
  return 0
end

local function version()
  io.write("procpool ", load_library().VERSION, "\n")
  return 0
end

---------------------------------------------------------------------------
-- main

--- Run the command line `argv` (as `arg`); returns the exit status: 0,
-- 1 (records failed, or the run could not finish), 2 (bad usage or a bad
-- script: nothing was run), 130 (Ctrl-C).
function M.main(argv)
  progress_shown = false
  local o, msg = M.parse(argv or {})
  if not o then
    say(msg)
    stderr:write(HINT)
    return 2
  end
  if o.command == "usage" then
    stderr:write(M.USAGE)
    return 2
  elseif o.command == "help" then
    io.write(M.USAGE)
    return 0
  end
  -- Ctrl-C before the run's own handling is set up (while the script
  -- loads or the pool starts) ends the same way as during the run
  local ok, status = pcall(o.command == "version" and version or run_map, o)
  if ok then return status end
  if is_interrupt(status) then
    say("interrupted")
    return 130
  end
  if getmetatable(status) == Usage then
    say(status.msg)
    if status.hint then stderr:write(HINT) end
    return 2
  end
  error(status, 0)
end

return M
