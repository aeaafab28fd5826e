-- Makespan (wall time from the first submit to the last result) of
-- heterogeneous workloads on 2 workers, beside Python's pools (fork) on
-- the same durations in the same run, and beside the lower bound
-- LB = max(total work / workers, longest task), with the performance
-- issue's target on procpool/LB. Tasks are sleeps, so the figures do not
-- depend on CPU contention. A last row checks the order in which
-- imap_unordered yields a slow item among fast ones after a burst.
local procpool = require "procpool"
local B = require "bench.lib"

local W, REPS, N_BURST = 2, 3, 2000
local SLEEP = "procpool.core.sleep" -- by name, as Python pickles time.sleep
local noop = function(x) return x end

--- n durations in seconds, heavy-tailed: Pareto (scale 1 ms, shape 0.9)
-- capped at 300 ms, in whole microseconds, drawn from a fixed LCG;
-- bench/py/pools.py draws the same sequence.
local function heavy_tail(n, seed)
  local s, ds = seed, {}
  for i = 1, n do
    s = (s * 1103515245 + 12345) % 2147483648
    local us = math.floor(1000 * (1 - s / 2147483648) ^ (-1 / 0.9))
    ds[i] = math.min(us, 300000) / 1e6
  end
  return ds
end

local function lower_bound(ds)
  local sum, max = 0, 0
  for i = 1, #ds do
    sum = sum + ds[i]
    max = math.max(max, ds[i])
  end
  return math.max(sum / W, max), sum, max
end

-- 1. heavy-tailed map: 200 tasks, mostly 1-5 ms, a few 50-300 ms
local heavy = heavy_tail(200, 3)
-- 2. adversarial: one 0.5 s task first, then 200 of 2 ms
local adv = { 0.5 }
for i = 2, 201 do adv[i] = 0.002 end

local function submit_all(ex, ds)
  local fs = {}
  for i = 1, #ds do fs[i] = ex:submit(SLEEP, ds[i]) end
  for i = 1, #ds do fs[i]:result() end
end

local function imap_all(pool, ds)
  for _ in pool:imap_unordered(SLEEP, ds, 1) do end
end

-- the burst before each adversarial run: the pool's duration estimate
-- then says "tasks are tiny"
local function ex_burst(ex)
  return function()
    local fs = {}
    for i = 1, N_BURST do fs[i] = ex:submit(noop, i) end
    for i = 1, N_BURST do fs[i]:result() end
  end
end

local function pool_burst(pool)
  return function()
    local rs = {}
    for i = 1, N_BURST do rs[i] = pool:apply_async(noop, { i }) end
    for i = 1, N_BURST do rs[i]:get() end
  end
end

-- 3. order: imap_unordered(f, { slow 0.5 s, fast, fast, fast }, 1) right
-- after a burst must yield the slow item last: a fast item queued behind
-- it on the same worker would come after it
local ORDER = { 0.5, 0.001, 0.001, 0.001 }
local sleep_and_return = function(d)
  require("procpool.core").sleep(d)
  return d
end
local function slow_last(pool)
  local last
  for i in pool:imap_unordered(sleep_and_return, ORDER, 1) do last = i end
  return last == 1
end

local t = {}
local ex = procpool.ProcessPoolExecutor { max_workers = W, context = "fork" }
ex:submit(noop):result()
t.heavy_submit = B.median(function() submit_all(ex, heavy) end, REPS)
t.adv_submit = B.median(function() submit_all(ex, adv) end, REPS, ex_burst(ex))
ex:shutdown()

local pool = procpool.Pool { processes = W, context = "fork" }
pool:map(noop, { 1, 2, 3 })
t.heavy_map = B.median(function() pool:map(SLEEP, heavy) end, REPS)
t.heavy_imap = B.median(function() imap_all(pool, heavy) end, REPS)
t.adv_map = B.median(function() pool:map(SLEEP, adv) end, REPS, pool_burst(pool))
t.adv_imap = B.median(function() imap_all(pool, adv) end, REPS, pool_burst(pool))
t.slow_last = 0
for _ = 1, REPS do
  pool_burst(pool)()
  if slow_last(pool) then t.slow_last = t.slow_last + 1 end
end
pool:close()
pool:join()

local py = B.python({ "makespan_heavy_work", "makespan_heavy_submit", "makespan_heavy_map",
  "makespan_heavy_imap", "makespan_adv_submit", "makespan_adv_map", "makespan_adv_imap",
  "makespan_slow_last" })

local lb_heavy, work, longest = lower_bound(heavy)
local lb_adv = lower_bound(adv)
if py.makespan_heavy_work and math.abs(py.makespan_heavy_work - work) > 1e-6 then
  error(string.format("Python's durations differ: %.6f s of work against %.6f s", py.makespan_heavy_work, work))
end

local rows = { { "workload (median of " .. REPS .. " runs)", "LB", "procpool", "procpool/LB", "target",
  "met", "Python", "Python/LB" } }
local function row(label, key, lb, target)
  local p = py["makespan_" .. key]
  local ok = target and (t[key] / lb <= target and "yes" or "NO") or "-"
  rows[#rows + 1] = { label, B.fmt(lb, " s"), B.fmt(t[key], " s"), B.ratio(t[key], lb, 2),
    target and string.format("<= %.2fx", target) or "-", ok, B.fmt(p, " s"), B.ratio(p, lb, 2) }
end
row("heavy tail, submit each + result", "heavy_submit", lb_heavy, 1.10)
row("heavy tail, Pool:map default chunks", "heavy_map", lb_heavy)
row("heavy tail, imap_unordered chunksize 1", "heavy_imap", lb_heavy, 1.10)
row("0.5 s first + 200 x 2 ms after a burst, submit", "adv_submit", lb_adv, 1.10)
row("0.5 s first + 200 x 2 ms after a burst, Pool:map", "adv_map", lb_adv, 1.30)
row("0.5 s first + 200 x 2 ms after a burst, imap_unordered 1", "adv_imap", lb_adv, 1.10)
local function runs(k) return k and string.format("%d of %d runs", k, REPS) or "n/a" end
rows[#rows + 1] = { "imap_unordered({0.5 s, 1 ms x 3}, 1) after a burst: slow last", "-",
  runs(t.slow_last), "-", "every run", t.slow_last == REPS and "yes" or "NO", runs(py.makespan_slow_last), "-" }

print("## Makespan (bench/makespan.lua), " .. W .. " workers")
print()
print(string.format("Heavy tail: 200 sleeps, %.2f s of work, longest %.2f s. Burst: %d no-op tasks, untimed.",
  work, longest, N_BURST))
print()
B.table(rows)
