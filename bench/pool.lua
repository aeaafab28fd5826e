-- procpool.Pool throughput beside Python's multiprocessing.Pool(2) (fork)
-- on the same workloads in the same run.
local procpool = require "procpool"
local B = require "bench.lib"

local N, N_ASYNC = 200000, 20000
local noop = function(x) return x end
local items = {}
for i = 1, N do items[i] = i end

local pool = procpool.Pool { processes = 2 }
pool:map(noop, { 1, 2, 3 })
local map = N / B.best(function() pool:map(noop, items) end, 3)
local unordered = N / B.best(function()
  for _ in pool:imap_unordered(noop, items, 1000) do end
end, 3)
local async = N_ASYNC / B.best(function()
  local rs = {}
  for i = 1, N_ASYNC do rs[i] = pool:apply_async(noop, { i }) end
  for i = 1, N_ASYNC do rs[i]:get() end
end, 3)
pool:close()
pool:join()

local py = B.python({ "pool_map", "pool_imap_unordered", "pool_apply_async" })

print("## Pool (bench/pool.lua), 2 processes")
print()
B.table({
  { "workload", "procpool", "Python", "ratio" },
  { "map of 200 000 no-ops, default chunking", B.fmt(map) .. " items/s",
    B.fmt(py.pool_map) .. " items/s", B.ratio(map, py.pool_map) },
  { "imap_unordered of 200 000 no-ops, chunksize 1000", B.fmt(unordered) .. " items/s",
    B.fmt(py.pool_imap_unordered) .. " items/s", B.ratio(unordered, py.pool_imap_unordered) },
  { "20 000 apply_async + get", B.fmt(async) .. " tasks/s",
    B.fmt(py.pool_apply_async) .. " tasks/s", B.ratio(async, py.pool_apply_async) },
})
