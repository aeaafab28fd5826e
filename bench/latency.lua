-- How long a finished result waits in its worker when the next item on
-- that worker is long: a chunk { quick, 50 ms } (the quick item's result
-- must come before the long one ends), on an idle worker and right after a
-- stream of 20 000 quick results. One worker. Waking an idle worker takes
-- 0.2 to 8 ms on a small VM whatever the design, so the idle case compares
-- the best of 15 runs of a chunk { quick, long } with the best of 15 of a
-- chunk { quick }.
local procpool = require "procpool"
local B = require "bench.lib"
local core = require "procpool.core"

local LONG = 0.05
local REPS = 15
-- busy for s seconds of wall time (a preempted worker still ends on time)
local function busy(s)
  local clock = require("procpool.core").monotonic
  local t = clock() + s
  while clock() < t do end
  return s
end

local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
ex:submit(busy, 0):result()

local function median(xs)
  table.sort(xs)
  return xs[(#xs + 1) // 2]
end

-- the time from a map's start to its first item, on an idle worker
local function first_item(list)
  core.sleep(0.02)
  local t = B.now()
  local it = ex:map(busy, list, { chunksize = #list })
  it()
  t = B.now() - t
  for _ in it do end
  return t
end

-- idle worker: a chunk { 0, LONG }'s first item, less a chunk { 0 }'s
local base, fresh, stream = math.huge, math.huge, {}
local items = {}
for i = 1, 20000 do items[i] = 0 end
items[#items + 1] = LONG
for k = 1, REPS do
  base = math.min(base, first_item { 0 })
  fresh = math.min(fresh, first_item { 0, LONG })
  -- after a stream: the last quick item should come LONG before the end
  local n, t_last = 0, nil
  for _ in ex:map(busy, items, { chunksize = #items }) do
    n = n + 1
    if n == #items - 1 then t_last = B.now() end
  end
  stream[k] = math.max(0, LONG - (B.now() - t_last))
  core.sleep(0.02)
end
ex:shutdown()

local f, s = math.max(0, fresh - base), median(stream)
print("## Result latency behind a long item (bench/latency.lua), 1 worker")
print()
print("Time a finished quick result waits in the worker while the next item (50 ms)")
print("runs (idle: best of " .. REPS .. " against a chunk of the quick item alone; after a")
print("stream: median of " .. REPS .. "). Without a flusher it would wait the whole 50 ms.")
print()
B.table({
  { "case", "wait", "target", "met" },
  { "worker idle before the chunk", string.format("%.2f ms", f * 1e3), "<= 1 ms",
    f <= 0.001 and "yes" or "NO" },
  { "right after 20 000 quick results", string.format("%.2f ms", s * 1e3), "<= 7 ms",
    s <= 0.007 and "yes" or "NO" },
})
