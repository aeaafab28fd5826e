-- procpool demo: a CPU-heavy job, run serially and then with a pool.
-- Counts the primes below LIMIT in blocks (one task per block), shows a
-- progress bar on a terminal, and prints the speedup.
-- Run: make demo   (or lua5.4 examples/demo.lua [limit])
local procpool = require "procpool"
local core = require "procpool.core"

local LIMIT = tonumber(arg and arg[1]) or 4000000
local BLOCK = 100000

local function count_primes(lo, hi)
  local n = 0
  for i = math.max(lo, 2), hi do
    local prime = i == 2 or i % 2 == 1
    local d = 3
    while prime and d * d <= i do
      if i % d == 0 then prime = false end
      d = d + 2
    end
    if prime then n = n + 1 end
  end
  return n
end

local blocks = {}
for lo = 1, LIMIT, BLOCK do blocks[#blocks + 1] = { lo, math.min(lo + BLOCK - 1, LIMIT) } end

local workers = procpool.cpu_count()
print(string.format("Counting the primes below %d in %d blocks; this machine has %d CPU(s).",
  LIMIT, #blocks, workers))

-- serially, in this process
local t0 = core.monotonic()
local serial = 0
for _, b in ipairs(blocks) do serial = serial + count_primes(b[1], b[2]) end
local t_serial = core.monotonic() - t0
print(string.format("serially:             %d primes in %.2f s", serial, t_serial))

-- in parallel: one task per block, results as they complete
t0 = core.monotonic()
local pool <close> = procpool.Pool { processes = workers }
local parallel = 0
local function count_block(b) return count_primes(b[1], b[2]) end
for _, n in pool:imap_unordered(count_block, blocks, { progress = true }) do
  parallel = parallel + n
end
local t_pool = core.monotonic() - t0
print(string.format("with %d worker process%s: %d primes in %.2f s", workers,
  workers == 1 and "" or "es", parallel, t_pool))
assert(parallel == serial, "the two counts differ")
print(string.format("speedup: %.2fx", t_serial / t_pool))
