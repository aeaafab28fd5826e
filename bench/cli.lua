-- `procpool map` (bin/procpool) beside GNU parallel --pipe on the same
-- per-line job, 2 processes each, in the same run: records per second,
-- whole command lines timed (start-up included).
--
-- Run from the repository root after `make`:
--   LUA_PATH='./?.lua;lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' lua5.4 bench/cli.lua
local B = require "bench.lib"

local JOBS = 2
local REPS = 3

--- The per-line job, as Lua source: `iters` rounds of an integer hash of
-- the line's number; the result is the line and the hash.
local function job_source(iters)
  return string.format([[
    local function job(line)
      local n = tonumber(line)
      local h = n
      for k = 1, %d do h = (h * 31 + k) %% 1000000007 end
      return line .. " " .. h
    end]], iters)
end

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function have(cmd)
  return os.execute("command -v " .. cmd .. " >/dev/null 2>&1") == true
end

--- Best wall time of a command line that must print `n` lines.
local function time_cmd(cmdline, n)
  local best = math.huge
  for _ = 1, REPS do
    local t = B.now()
    local out = B.capture(cmdline .. " | wc -l")
    t = B.now() - t
    local got = out and tonumber(out:match("%d+"))
    if got ~= n then
      io.stderr:write("bench/cli.lua: expected ", n, " lines, got ", tostring(got), " from:\n  ",
        cmdline, "\n")
      return nil
    end
    if t < best then best = t end
  end
  return best
end

local dir = B.capture("mktemp -d"):match("[^\n]+")
local has_parallel = have("parallel")

local workloads = {
  { name = "light (20 hash rounds a line)", iters = 20, n = 1000000 },
  { name = "heavy (2 000 hash rounds a line)", iters = 2000, n = 200000 },
}

local rows = { { "workload", "records", "procpool map", "procpool --unordered",
  "GNU parallel --pipe -k", "GNU parallel --pipe", "ratio (ordered)", "ratio (unordered)" } }
for _, w in ipairs(workloads) do
  local src = job_source(w.iters)
  local script = dir .. "/job" .. w.iters .. ".lua"
  local f = assert(io.open(script, "w"))
  f:write(src, "\nreturn job\n")
  f:close()
  local input = string.format("seq 1 %d | ", w.n)
  local pp = string.format("%sbin/procpool map -j %d %s", input, JOBS, script)
  local t_ordered = time_cmd(pp, w.n)
  local t_unordered = time_cmd(pp .. " --unordered", w.n)
  local t_par, t_par_unordered
  if has_parallel then
    local per_line = src .. "\nfor line in io.lines() do io.write(job(line), '\\n') end"
    local par = string.format("%sparallel --will-cite -q --pipe -j%d --block 1M lua5.4 -e %s",
      input, JOBS, shell_quote(per_line:gsub("\n%s*", " ")))
    t_par = time_cmd(par:gsub("parallel ", "parallel -k ", 1), w.n)
    t_par_unordered = time_cmd(par, w.n)
  end
  local function rate(t) return t and w.n / t end
  rows[#rows + 1] = {
    w.name, B.fmt(w.n),
    B.fmt(rate(t_ordered), "/s"), B.fmt(rate(t_unordered), "/s"),
    has_parallel and B.fmt(rate(t_par), "/s") or "n/a (not installed)",
    has_parallel and B.fmt(rate(t_par_unordered), "/s") or "n/a",
    B.ratio(rate(t_ordered), rate(t_par)), B.ratio(rate(t_unordered), rate(t_par_unordered)),
  }
end
os.execute("rm -rf " .. shell_quote(dir))

print(string.format("## procpool map beside GNU parallel (bench/cli.lua), %d processes", JOBS))
print()
print("Records per second, best of " .. REPS .. "; ratio = procpool / parallel.")
print()
B.table(rows)
