-- Shared helpers for the benchmarks: timing, tables, running Python.
local core = require "procpool.core"
local B = {}

B.now = core.monotonic

--- Best (minimum) wall time of `fn` over `reps` runs, after a warm-up;
-- garbage is collected before each run, outside the timing.
function B.best(fn, reps)
  reps = reps or 5
  fn()
  local best = math.huge
  for _ = 1, reps do
    collectgarbage()
    collectgarbage()
    local t = B.now()
    fn()
    t = B.now() - t
    if t < best then best = t end
  end
  return best
end

--- Median wall time of `fn` over `reps` runs (3 by default), after a
-- warm-up run; `setup`, if given, runs before each run, outside the
-- timing, after which garbage is collected, also outside it.
function B.median(fn, reps, setup)
  reps = reps or 3
  local ts = {}
  for k = 0, reps do
    if setup then setup() end
    collectgarbage()
    collectgarbage()
    local t = B.now()
    fn()
    t = B.now() - t
    if k > 0 then ts[k] = t end
  end
  table.sort(ts)
  return reps % 2 == 1 and ts[(reps + 1) // 2] or (ts[reps // 2] + ts[reps // 2 + 1]) / 2
end

--- Print rows as an aligned table. rows[1] is the header.
function B.table(rows)
  local w = {}
  for _, r in ipairs(rows) do
    for i, c in ipairs(r) do w[i] = math.max(w[i] or 0, #tostring(c)) end
  end
  for k, r in ipairs(rows) do
    local out = {}
    for i, c in ipairs(r) do
      c = tostring(c)
      out[i] = i == 1 and c .. (" "):rep(w[i] - #c) or (" "):rep(w[i] - #c) .. c
    end
    print("| " .. table.concat(out, " | ") .. " |")
    if k == 1 then
      local sep = {}
      for i = 1, #w do sep[i] = (i == 1 and "" or "") .. ("-"):rep(w[i]) end
      print("|-" .. table.concat(sep, "-|-") .. "-|")
    end
  end
end

function B.fmt(x, unit)
  if x == nil then return "n/a" end
  if x >= 1e6 then return string.format("%.2fM%s", x / 1e6, unit or "")
  elseif x >= 1e3 then return string.format("%.1fk%s", x / 1e3, unit or "")
  elseif x >= 10 then return string.format("%.0f%s", x, unit or "")
  else return string.format("%.2f%s", x, unit or "") end
end

--- Run a command, return its stdout (nil on failure).
function B.capture(cmd)
  local p = io.popen(cmd)
  local out = p:read("a")
  local ok = p:close()
  return ok and out or nil
end

B.bin = os.getenv("PROCPOOL_BENCH_BIN") or "build/bench"

--- "a/b x" formatted (with `digits` decimals, 1 by default), or n/a.
function B.ratio(a, b, digits)
  if not a or not b or b == 0 then return "n/a" end
  return string.format("%." .. (digits or 1) .. "fx", a / b)
end

--- Run Python's side of the workloads; returns a table name -> figure
-- (empty when python3 is missing).
function B.python(workloads)
  local py = os.getenv("PYTHON") or "python3"
  local out = B.capture(py .. " bench/py/pools.py " .. table.concat(workloads, " ") .. " 2>/dev/null")
  if not out then return {} end
  local ok, cjson = pcall(require, "cjson")
  if ok then
    local okd, t = pcall(cjson.decode, out)
    if okd then return t end
  end
  local t = {}
  for k, v in out:gmatch('"([%w_]+)":%s*([%d%.e%+%-]+)') do t[k] = tonumber(v) end
  return t
end

return B
