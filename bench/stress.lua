-- Stress: 1 000 000 tasks while a killer process SIGKILLs a random worker
-- every few milliseconds. Every future must end exactly once: completed
-- with the right value, failed with a named procpool error, or cancelled.
-- Usage: lua5.4 bench/stress.lua [tasks] [kill interval ms]
local procpool = require "procpool"
local core = require "procpool.core"

local N = tonumber(arg and arg[1]) or 1000000
local EVERY_MS = tonumber(arg and arg[2]) or 5
local WAVE = 10000

local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
ex:submit(function() end):result(10)

-- our pid, and the zygote's (our only child)
local me = tonumber(io.open("/proc/self/stat"):read("l"):match("^(%d+)"))
local zygote = tonumber(io.open(("/proc/%d/task/%d/children"):format(me, me)):read("a"):match("%d+"))
local killlog = os.tmpname()
local killer = io.popen(([[
  while kill -0 %d 2>/dev/null; do
    kids=$(cat /proc/%d/task/%d/children 2>/dev/null)
    if [ -n "$kids" ]; then
      victim=$(echo $kids | tr ' ' '\n' | shuf -n 1)
      kill -9 $victim 2>/dev/null && echo $victim >> %s
    fi
    sleep %s
  done & echo $!]]):format(me, zygote, zygote, killlog, EVERY_MS / 1000))
local killer_pid = tonumber(killer:read("l"))

local tally = { completed = 0, wrong = 0, cancelled = 0, missing = 0, twice = 0 }
local errors = {}
local t0 = core.monotonic()
local submitted = 0
while submitted < N do
  local n = math.min(WAVE, N - submitted)
  local fs, calls = {}, {}
  for i = 1, n do
    local k = submitted + i
    local f = ex:submit(function(x) return x * 2 end, k)
    fs[i] = f
    f:add_done_callback(function() calls[i] = (calls[i] or 0) + 1 end)
  end
  -- cancel a few still-pending ones, so cancellation races the kills too
  for i = n, n - 50, -1 do fs[i]:cancel() end
  local _, not_done = procpool.wait(fs, { timeout = 120 })
  tally.missing = tally.missing + #not_done
  for i = 1, n do
    local f = fs[i]
    if f:done() then
      if f:cancelled() then
        tally.cancelled = tally.cancelled + 1
      else
        local ok, v = pcall(f.result, f, 0)
        if ok then
          if v == (submitted + i) * 2 then
            tally.completed = tally.completed + 1
          else
            tally.wrong = tally.wrong + 1
          end
        elseif procpool.is_error(v) then
          errors[v.name] = (errors[v.name] or 0) + 1
        else
          tally.wrong = tally.wrong + 1
        end
      end
    end
  end
  core.drain()
  for i = 1, n do
    if (calls[i] or 0) ~= 1 and fs[i]:done() then tally.twice = tally.twice + 1 end
  end
  submitted = submitted + n
end
local elapsed = core.monotonic() - t0
os.execute("kill " .. killer_pid .. " 2>/dev/null")
killer:close()
local kills = 0
for _ in io.lines(killlog) do kills = kills + 1 end
os.remove(killlog)
local st = ex:stats()
ex:shutdown()

local failed = 0
for _, c in pairs(errors) do failed = failed + c end
print("## stress (bench/stress.lua)")
print()
print(string.format("tasks: %d in %.1f s (%.0f tasks/s), a worker SIGKILLed every %d ms",
  N, elapsed, N / elapsed, EVERY_MS))
print(string.format("kills: %d; worker_restarts: %d", kills, st.worker_restarts))
print(string.format("completed: %d, failed: %d %s, cancelled: %d", tally.completed, failed,
  (function()
    local parts = {}
    for name, c in pairs(errors) do parts[#parts + 1] = name .. "=" .. c end
    return "(" .. table.concat(parts, ", ") .. ")"
  end)(), tally.cancelled))
print(string.format("missing: %d, wrong value: %d, callback not exactly once: %d",
  tally.missing, tally.wrong, tally.twice))
local total = tally.completed + failed + tally.cancelled
local ok = total == N and tally.missing == 0 and tally.wrong == 0 and tally.twice == 0
print(ok and "every future accounted for exactly once" or "FAILED: futures unaccounted for")
os.exit(ok and 0 or 1)
