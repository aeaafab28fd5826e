-- Writes the seed corpus for the decoder fuzz target: serialized samples
-- of every type and rule. Run: lua5.4 spec/fuzz/make_corpus.lua DIR
local pp = require "procpool"
local dir = assert(arg[1], "usage: make_corpus.lua DIR")
local shared = { 1 }
local n = 0
local inc = function() n = n + 1 return n end
local get = function() return n end
local function fact(k) return k <= 1 and 1 or k * fact(k - 1) end
local samples = {
  { nil }, { true, false }, { 0, 127, 128, -1, -129, 40000, -2 ^ 31, math.maxinteger },
  { 3.0, -0.0, 1 / 0, 0 / 0, 0.1 }, { "", "short", ("x"):rep(300), ("\0\1"):rep(40000) },
  { { 1, 2, 3, nil, 5, a = { b = { c = "d" } } } }, { { [true] = 1, [1.5] = 2, [{}] = 3 } },
  { shared, { shared, shared } }, { setmetatable({}, { __index = { x = 1 } }) },
  { function(x) return x + 1 end }, { inc, get }, { fact }, { math.floor, string.format, print },
  { string, _G }, { core = require "procpool.core" },
}
local c = {}
c.self = c
samples[#samples + 1] = { c }
for i, s in ipairs(samples) do
  local f = assert(io.open(string.format("%s/seed-%02d", dir, i), "wb"))
  f:write(pp.serialize(table.unpack(s, 1, #s)))
  f:close()
end
