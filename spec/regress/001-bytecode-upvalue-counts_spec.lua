-- Regression: hostile function bytecode must not reach Lua 5.4.4's loader
-- unchecked. Its loader writes upvalue names past their array when the
-- name count and the upvalue count disagree (found by the decoder fuzzer),
-- and a closure's upvalue count is a separate byte from its prototype's.
local procpool = require "procpool"

describe("regression: bytecode with inconsistent upvalue counts", function()
  it("rejects upvalue names beyond the upvalue array (fuzzer find)", function()
    local input = "\27PP\1\2.\1p\27LuaT\0\25\147\13\10\26\10\4\8\8xV\0\0\0\0\0\0\0\0\0\0\0(w@\1\155@spec/fuzz/make_corpus.lua\135\135\0\0\2\135\9\0\0\0\21\0\0\128/\0\128\6\10\0\0\0\9\0\0\0\1\0\128\129\1\3\0\135\128\0\0\0\0\0\0\0\128\128\129\0\0\0\128\128\129\130n\1\15[\138\8\1" -- luacheck: ignore 631
    local ok, e = pcall(procpool.deserialize, input)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "SerializationError"))
    assert.matches("malformed function bytecode", e.message)
  end)

  it("rejects a closure whose upvalue count differs from its prototype's", function()
    local up = 1
    local s = procpool.serialize(function() return up end)
    -- the closure's count is the byte after the 31-byte bytecode header
    local at = assert(s:find("\27Lua", 1, true)) + 31
    assert.are.equal(1, s:byte(at)) -- just `up`
    local bad = s:sub(1, at - 1) .. "\2" .. s:sub(at + 1)
    local ok, e = pcall(procpool.deserialize, bad)
    assert.is_false(ok)
    assert.matches("malformed function bytecode", e.message)
  end)
end)
