-- Codec throughput: procpool.serialize / deserialize on four shapes, with
-- Lua's own string.pack / string.dump+load, and memcpy, as baselines.
local procpool = require "procpool"
local B = require "bench.lib"
local ser, des = procpool.serialize, procpool.deserialize

local rows = { { "shape", "encode", "decode", "encode vals/s", "decode vals/s", "baseline",
  "baseline enc", "baseline dec" } }
local summary = {}

local function measure(name, value, nvals)
  local s = ser(value)
  local te = B.best(function() ser(value) end)
  local td = B.best(function() des(s) end)
  rows[#rows + 1] = { name, B.fmt(#s / te / 1e6) .. " MB/s", B.fmt(#s / td / 1e6) .. " MB/s",
    B.fmt(nvals / te), B.fmt(nvals / td), "-", "-", "-" }
  return te, td, #s
end

-- 1e6 small integers in a table; baseline: string.pack / string.unpack
local ints = {}
for i = 1, 1e6 do ints[i] = i % 128 end
local te, td = measure("1e6 small ints", ints, 1e6)
do
  local fmt = "<" .. ("i8"):rep(100)
  local unpack = table.unpack
  local pe = B.best(function()
    local parts = {}
    for i = 1, 1e6, 100 do parts[#parts + 1] = string.pack(fmt, unpack(ints, i, i + 99)) end
    return table.concat(parts)
  end)
  local packed = {}
  for i = 1, 1e6, 100 do packed[#packed + 1] = string.pack(fmt, unpack(ints, i, i + 99)) end
  packed = table.concat(packed)
  local pd = B.best(function()
    local t, pos = {}, 1
    for i = 1, 1e6, 100 do
      local vals = { string.unpack(fmt, packed, pos) }
      pos = vals[101]
      table.move(vals, 1, 100, i, t)
    end
  end)
  rows[#rows][6], rows[#rows][7], rows[#rows][8] = "string.pack/unpack", B.fmt(1e6 / pe),
    B.fmt(1e6 / pd)
end
summary.ints_enc, summary.ints_dec = 1e6 / te, 1e6 / td

-- a 64 MiB string; baseline: memcpy into fresh memory (and warm)
local big = ("\0\1\2\3procpool"):rep(64 * 1024 * 1024 // 12) .. ("x"):rep(64 * 1024 * 1024 % 12)
local bte, btd, bsize = measure("64 MiB string", big, 1)
local mc = B.capture(B.bin .. "/memcpy 64")
local fresh = mc and tonumber(mc:match("fresh (%d+)"))
local warm = mc and tonumber(mc:match("warm (%d+)"))
rows[#rows][6], rows[#rows][7], rows[#rows][8] = "memcpy fresh/warm",
  fresh and B.fmt(fresh) .. " MB/s" or "n/a", warm and B.fmt(warm) .. " MB/s" or "n/a"
summary.big_rt = bsize / (bte + btd) / 1e6

-- 1e5 small records
local recs = {}
for i = 1, 1e5 do
  recs[i] = { id = i, name = "user" .. i, score = i * 0.25, active = i % 2 == 0, tags = { "a", "b" } }
end
measure("1e5 records", recs, 1e5 * 7)

-- a closure with 5 upvalues; baseline: string.dump + load
local a, b, c, d, e = 1, "two", 3.5, { 4 }, math.floor
local fn = function(x) return a, b, c, d, e, x end
local reps = 20000
local cte = B.best(function() for _ = 1, reps do ser(fn) end end)
local cs = ser(fn)
local ctd = B.best(function() for _ = 1, reps do des(cs) end end)
local dte = B.best(function() for _ = 1, reps do string.dump(fn) end end)
local dump = string.dump(fn)
local dtd = B.best(function() for _ = 1, reps do load(dump, "=f", "b") end end)
rows[#rows + 1] = { "closure, 5 upvalues", B.fmt(#cs * reps / cte / 1e6) .. " MB/s",
  B.fmt(#cs * reps / ctd / 1e6) .. " MB/s", B.fmt(reps / cte), B.fmt(reps / ctd),
  "string.dump/load", B.fmt(reps / dte), B.fmt(reps / dtd) }

print("## codec (bench/codec.lua)")
print()
B.table(rows)
print()
local t1 = fresh and summary.big_rt / fresh or nil
print(string.format("64 MiB string, encode+decode: %s MB/s = %s of memcpy into fresh memory, %s of "
  .. "warm memcpy (target >= 0.5 of memcpy)", B.fmt(summary.big_rt),
  t1 and string.format("%.2f", t1) or "n/a",
  warm and string.format("%.2f", summary.big_rt / warm) or "n/a"))
print(string.format("small-value table: encode %s values/s, decode %s values/s (target >= 50M)",
  B.fmt(summary.ints_enc), B.fmt(summary.ints_dec)))
