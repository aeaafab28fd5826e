-- ProcessPoolExecutor throughput and latency, beside Python's
-- ProcessPoolExecutor(2) (fork) on the same workloads in the same run.
local procpool = require "procpool"
local B = require "bench.lib"

local N_PIPE, N_SEQ, N_MAP = 20000, 2000, 200000
local noop = function(x) return x end

local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
ex:submit(noop):result()

local pipelined = N_PIPE / B.best(function()
  local fs = {}
  for i = 1, N_PIPE do fs[i] = ex:submit(noop) end
  for i = 1, N_PIPE do fs[i]:result() end
end, 3)

local sequential = B.best(function()
  for _ = 1, N_SEQ do ex:submit(noop):result() end
end, 3) / N_SEQ * 1e6

local items = {}
for i = 1, N_MAP do items[i] = i end
local map = N_MAP / B.best(function()
  for _ in ex:map(noop, items) do end
end, 3)

-- the cost of captured output (issue: output = "capture"), per tiny task
local quiet = function() end
local cap_pipe = N_PIPE / B.best(function()
  local fs = {}
  for i = 1, N_PIPE do fs[i] = ex:submit_with({ output = "capture" }, noop) end
  for i = 1, N_PIPE do fs[i]:result() end
end, 3)
local cap_map = N_MAP / B.best(function()
  for _ in ex:map(noop, items, { output = "capture", on_output = quiet }) do end
end, 3)
ex:shutdown()

local py = B.python({ "executor_pipelined", "executor_sequential", "executor_map" })

print("## ProcessPoolExecutor (bench/executor.lua), 2 workers")
print()
B.table({
  { "workload", "procpool", "Python", "ratio" },
  { "20 000 no-op submit+result (pipelined)", B.fmt(pipelined) .. " tasks/s",
    B.fmt(py.executor_pipelined) .. " tasks/s", B.ratio(pipelined, py.executor_pipelined) },
  { "sequential submit():result() latency", string.format("%.0f us", sequential),
    py.executor_sequential and string.format("%.0f us", py.executor_sequential) or "n/a",
    B.ratio(py.executor_sequential, sequential) },
  { "map of 200 000 no-ops, default chunking", B.fmt(map) .. " items/s",
    B.fmt(py.executor_map) .. " items/s", B.ratio(map, py.executor_map) },
})
print()
print("Captured output (`output = \"capture\"`), the same workloads: the cost per tiny task")
print()
B.table({
  { "workload", "inherit", "capture", "extra per task" },
  { "20 000 no-op submit+result (pipelined)", B.fmt(pipelined) .. " tasks/s",
    B.fmt(cap_pipe) .. " tasks/s", string.format("%.2f us", (1 / cap_pipe - 1 / pipelined) * 1e6) },
  { "map of 200 000 no-ops, `on_output` given", B.fmt(map) .. " items/s",
    B.fmt(cap_map) .. " items/s", string.format("%.2f us", (1 / cap_map - 1 / map) * 1e6) },
})
