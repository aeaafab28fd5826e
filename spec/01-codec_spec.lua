-- The value codec: procpool.serialize / procpool.deserialize.
local procpool = require "procpool"
local ser, des = procpool.serialize, procpool.deserialize

local function rt(...) return des(ser(...)) end
local function bits(x) return string.pack("<d", x) end

local function err_of(fn, ...)
  local ok, e = pcall(fn, ...)
  assert.is_false(ok)
  return e
end

describe("codec", function()
  after_each(function()
    collectgarbage()
    collectgarbage()
  end)

  describe("scalars", function()
    it("round-trips nil and booleans", function()
      assert.is_nil((rt(nil)))
      assert.is_true((rt(true)))
      assert.is_false((rt(false)))
    end)

    it("round-trips all integer widths exactly", function()
      local ints = { 0, 1, 63, 127, 128, 255, 256, -1, -128, -129, 32767, 32768, -32768, -32769,
        2147483647, 2147483648, -2147483648, -2147483649, math.maxinteger, math.mininteger,
        0x123456789abcdef }
      for _, i in ipairs(ints) do
        local v = rt(i)
        assert.are.equal(i, v)
        assert.are.equal("integer", math.type(v))
      end
    end)

    it("keeps floats bit-exact: -0.0, inf, nan, and 3.0 stays a float", function()
      local nan_payload = string.unpack("<d", "\1\0\0\0\0\0\248\127")
      for _, x in ipairs({ 3.0, -0.0, 0.0, 1 / 0, -1 / 0, 0 / 0, nan_payload, 0.1, 1e308, 5e-324,
        -2.5 }) do
        local v = rt(x)
        assert.are.equal("float", math.type(v))
        assert.are.equal(bits(x), bits(v))
      end
    end)

    it("round-trips binary strings of any size", function()
      local bin = {}
      for i = 0, 255 do bin[#bin + 1] = string.char(i) end
      bin = table.concat(bin)
      for _, n in ipairs({ 0, 1, 63, 64, 255, 256, 65535, 65536 }) do
        local s = (bin:rep(n // 256 + 1)):sub(1, n)
        assert.are.equal(s, rt(s))
      end
      local big = ("\0\1xyz"):rep(3 * 1024 * 1024)
      assert.are.equal(big, rt(big))
    end)

    it("keeps references right around large strings", function()
      local big1, big2 = ("a"):rep(100000), ("b"):rep(40000)
      local t = { "shared" }
      local n = 0
      local inc = function() n = n + 1 return n end
      local get = function() return n end
      local a, b, c, d, e = rt(big1, { t, big2, t }, big2, inc, { big1, get, t })
      assert.are.equal(big1, a)
      assert.are.equal(b[1], b[3])
      assert.are.equal(b[1], e[3])
      assert.are.equal(big2, c)
      d()
      assert.are.equal(1, e[2]())
    end)

    it("keeps the count of multiple values, nils included", function()
      assert.are.equal(0, select("#", rt()))
      assert.are.equal(3, select("#", rt(nil, nil, nil)))
      local t = table.pack(rt(1, nil, "a", nil))
      assert.are.same({ n = 4, 1, nil, "a", nil }, t)
    end)
  end)

  describe("tables", function()
    it("round-trips arrays, hashes, holes and nesting", function()
      local t = { 1, 2, 3, nil, 5, x = { y = { z = "deep" } }, [10] = "ten", [-1] = "neg" }
      local v = rt(t)
      assert.are.same(t, v)
      assert.is_nil(v[4])
    end)

    it("accepts any key type", function()
      local tk, fk = {}, function() end
      local t = { [true] = 1, [false] = 2, [1.5] = 3, [tk] = 4, [fk] = 5, [math.mininteger] = 6 }
      local v = rt(t)
      assert.are.equal(1, v[true])
      assert.are.equal(2, v[false])
      assert.are.equal(3, v[1.5])
      assert.are.equal(6, v[math.mininteger])
      local nt, nf = 0, 0
      for k, val in pairs(v) do
        if type(k) == "table" then nt = nt + 1; assert.are.equal(4, val) end
        if type(k) == "function" then nf = nf + 1; assert.are.equal(5, val) end
      end
      assert.are.equal(1, nt)
      assert.are.equal(1, nf)
    end)

    it("preserves shared references and cycles", function()
      local shared = { "s" }
      local t = { a = shared, b = shared }
      t.self = t
      local v = rt(t)
      assert.are.equal(v.a, v.b)
      assert.are.equal(v, v.self)
      assert.are_not.equal(shared, v.a)
    end)

    it("preserves sharing across top-level values", function()
      local s = {}
      local a, b, c = rt(s, { s }, s)
      assert.are.equal(a, c)
      assert.are.equal(a, b[1])
    end)

    it("sends metatables of plain tables by value, shared", function()
      local mt = { __index = { greet = "hi" } }
      local a, b = setmetatable({}, mt), setmetatable({}, mt)
      local x, y = rt(a, b)
      assert.are.equal("hi", x.greet)
      assert.are.equal(getmetatable(x), getmetatable(y))
      assert.are_not.equal(mt, getmetatable(x))
    end)

    it("round-trips a table nested 10 000 levels deep", function()
      local t = {}
      local cur = t
      for _ = 1, 10000 do
        cur.next = {}
        cur = cur.next
      end
      local v = rt(t)
      local depth = 0
      while v.next do
        v = v.next
        depth = depth + 1
      end
      assert.are.equal(10000, depth)
    end)

    it("refuses nesting beyond its limit cleanly", function()
      local t = {}
      local cur = t
      for _ = 1, 150000 do
        cur[1] = {}
        cur = cur[1]
      end
      local e = err_of(ser, t)
      assert.is_true(procpool.is_error(e, "SerializationError"))
      assert.matches("nesting too deep", e.message)
    end)
  end)

  describe("functions", function()
    it("sends closures as bytecode with upvalues by value", function()
      local up = 10
      local f = function(x) up = up + x; return up end
      local g = rt(f)
      assert.are.equal(11, g(1))
      assert.are.equal(13, g(2))
      assert.are.equal(10, up) -- the original is untouched
    end)

    it("keeps debug info, so errors and tracebacks keep line numbers", function()
      local function boom() error("kaboom") end
      local _, e1 = pcall(boom)
      local _, e2 = pcall(rt(boom))
      assert.are.equal(e1, e2)
      assert.matches("01%-codec_spec.lua:%d+: kaboom", e2)
      local info = debug.getinfo(rt(boom), "S")
      assert.are.equal(debug.getinfo(boom, "S").linedefined, info.linedefined)
    end)

    it("rebinds _ENV to the receiver's globals", function()
      local f = function() return tostring(1) .. type({}) end
      local g = rt(f)
      assert.are.equal("1table", g())
      local name, env = debug.getupvalue(g, 1)
      assert.are.equal("_ENV", name)
      assert.are.equal(_G, env)
    end)

    it("rebinds even a custom _ENV (data travels in ordinary upvalues)", function()
      local f
      do
        local _ENV = { x = 42 } -- luacheck: ignore 211
        f = function() return x end -- luacheck: ignore 113
      end
      rawset(_G, "x", "global x")
      local v = rt(f)()
      rawset(_G, "x", nil)
      assert.are.equal("global x", v)
    end)

    it("keeps upvalues shared between closures shared", function()
      local n = 0
      local inc = function() n = n + 1 return n end
      local get = function() return n end
      local i2, g2 = rt(inc, get)
      i2()
      i2()
      assert.are.equal(2, g2())
      assert.are.equal(0, n)
    end)

    it("handles recursive and mutually recursive local functions", function()
      local function fact(n) return n <= 1 and 1 or n * fact(n - 1) end
      assert.are.equal(120, rt(fact)(5))
      local is_even, is_odd
      function is_even(n) return n == 0 or is_odd(n - 1) end
      function is_odd(n) return n ~= 0 and is_even(n - 1) end
      local e2, o2 = rt(is_even, is_odd)
      assert.is_true(e2(10))
      assert.is_true(o2(7))
      assert.is_false(rt(is_even)(7))
    end)

    it("sends functions inside tables and tables inside upvalues", function()
      local cfg = { mult = 3 }
      local t = { op = function(x) return x * cfg.mult end }
      local v = rt(t)
      assert.are.equal(12, v.op(4))
    end)
  end)

  describe("by name", function()
    it("sends module tables by name", function()
      local cjson = require "cjson"
      local f = function(x) return cjson.encode(x) end
      local g = rt(f)
      local _, up = debug.getupvalue(g, 1)
      assert.are.equal(cjson, up)
      assert.are.equal(string, (rt(string)))
      assert.are.equal(_G, (rt(_G)))
    end)

    it("sends C functions reachable from package.loaded by name", function()
      local floor = math.floor
      local f = function(x) return floor(x) end
      assert.are.equal(3, rt(f)(3.7))
      assert.are.equal(print, (rt(print)))
      assert.are.equal(string.format, (rt(string.format)))
      local a, b = rt(math.floor, io.write)
      assert.are.equal(math.floor, a)
      assert.are.equal(io.write, b)
    end)

    it("finds a host function registered as a global", function()
      local hostfn = coroutine.wrap(function() end) -- a C closure
      rawset(_G, "spec_hostfn", hostfn)
      local ok, v = pcall(rt, hostfn)
      rawset(_G, "spec_hostfn", nil)
      assert.is_true(ok)
      assert.are.equal(hostfn, v)
    end)

    it("finds modules loaded after an earlier call", function()
      assert.is_truthy(ser(print))
      local mod = { fn = coroutine.wrap(function() end) }
      package.loaded["spec_latemod"] = mod
      local ok, v = pcall(rt, mod.fn)
      local ok2, m = pcall(rt, mod)
      package.loaded["spec_latemod"] = nil
      assert.is_true(ok)
      assert.are.equal(mod.fn, v)
      assert.is_true(ok2)
      assert.are.equal(mod, m)
    end)

    it("requires a module in the receiver when needed", function()
      local ok, out = require("spec.helper").run_lua([[
        package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
        package.cpath = "]] .. (os.getenv("PROCPOOL_BUILD") or "build") .. [[/?.so;" .. package.cpath
        local pp = require "procpool"
        local cj = require "cjson"
        local s = pp.serialize(function(x) return cj.encode(x) end)
        package.loaded.cjson = nil
        local f = pp.deserialize(s)
        io.write(f({1,2}), " ", tostring(package.loaded.cjson ~= nil))
      ]])
      assert.is_true(ok)
      assert.are.equal("[1,2] true", out)
    end)
  end)

  describe("__serialize", function()
    local Point = {}
    Point.__index = Point
    Point.__serialize = function(p) return "spec_point.new", p.x, p.y end
    local mod = { new = function(x, y) return setmetatable({ x = x, y = y }, Point) end }

    before_each(function() package.loaded.spec_point = mod end)
    after_each(function() package.loaded.spec_point = nil end)

    it("sends a table as its constructor name and arguments", function()
      local p = mod.new(1, 2)
      local v = rt(p)
      assert.are.equal(Point, getmetatable(v))
      assert.are.same({ 1, 2 }, { v.x, v.y })
    end)

    it("keeps a shared instance shared", function()
      local p = mod.new(3, 4)
      local a, b = rt(p, { p })
      assert.are.equal(a, b[1])
    end)

    it("works for userdata", function()
      local u = io.tmpfile()
      u:close()
      debug.setmetatable(u, { __serialize = function() return "spec_point.new", 7, 8 end })
      local v = rt({ u })
      assert.are.equal(7, v[1].x)
    end)

    it("reports a failing or malformed __serialize", function()
      local bad = setmetatable({}, { __serialize = function() error("nope") end })
      assert.matches("value%[1%]: __serialize failed: .*nope", tostring(err_of(ser, bad)))
      local bad2 = setmetatable({}, { __serialize = function() return 42 end })
      assert.matches("must return a constructor name", tostring(err_of(ser, bad2)))
    end)

    it("refuses a cycle through a __serialize value", function()
      local o = {}
      setmetatable(o, { __serialize = function(self) return "spec_point.new", self end })
      assert.matches("cyclic reference", tostring(err_of(ser, o)))
    end)

    it("reports an unknown constructor in the receiver", function()
      local s = ser(mod.new(1, 2))
      package.loaded.spec_point = nil
      package.preload.spec_point = nil
      local e = err_of(des, s)
      assert.is_true(procpool.is_error(e, "SerializationError"))
      assert.matches("cannot find constructor 'spec_point.new'", e.message)
    end)
  end)

  describe("refusals", function()
    it("names the path to a coroutine", function()
      local co = coroutine.create(print)
      local e = err_of(ser, 1, { handlers = { 1, 2, co } })
      assert.is_true(procpool.is_error(e, "SerializationError"))
      assert.are.equal("SerializationError", e.name)
      assert.are.equal("value[2].handlers[3]: cannot serialize a coroutine", e.message)
      assert.are.equal("procpool.SerializationError: value[2].handlers[3]: cannot serialize a coroutine",
        tostring(e))
    end)

    it("refuses userdata without __serialize", function()
      local f = io.tmpfile()
      local e = err_of(ser, { file = f })
      f:close()
      assert.are.equal("value[1].file: cannot serialize a userdata (it has no __serialize metamethod)",
        e.message)
    end)

    it("refuses light userdata", function()
      local f = function() return print end
      local lud = debug.upvalueid(f, 1)
      assert.are.equal("value[1]: cannot serialize a light userdata", err_of(ser, lud).message)
    end)

    it("refuses C functions not reachable by name", function()
      local w = coroutine.wrap(function() end)
      local e = err_of(ser, { ["odd key"] = w })
      assert.matches('^value%[1%]%["odd key"%]: cannot serialize a C function', e.message)
    end)

    it("names upvalues and keys in the path", function()
      local co = coroutine.create(print)
      local f = function() return co end
      assert.are.equal("value[1].<upvalue co>: cannot serialize a coroutine", err_of(ser, f).message)
      assert.are.equal("value[1].<key>: cannot serialize a coroutine", err_of(ser, { [co] = 1 }).message)
      assert.are.equal("value[1].<metatable>.__index: cannot serialize a coroutine",
        err_of(ser, setmetatable({}, { __index = co })).message)
    end)

    it("leaves nothing half-written: the next call is correct", function()
      local co = coroutine.create(print)
      local big = ("x"):rep(100000)
      err_of(ser, { big, { co } })
      local t = { 1, { 2, { 3 } }, big }
      assert.are.same(t, rt(t))
    end)
  end)

  describe("hostile input", function()
    local sample = ser(1, -1, 2.5, "str", { 1, 2, a = { b = "c" } }, function(x) return x end,
      math.floor, setmetatable({}, { __index = { 1 } }))

    local function clean(s)
      local ok, e = pcall(des, s)
      if not ok then
        assert.is_true(procpool.is_error(e, "SerializationError"), tostring(e))
      end
      return ok
    end

    it("rejects data that is not procpool's, or another version", function()
      assert.matches("not procpool data", err_of(des, "hello").message)
      assert.matches("not procpool data", err_of(des, "").message)
      local v2 = sample:sub(1, 3) .. "\2" .. sample:sub(5)
      assert.matches("unsupported format version 2", err_of(des, v2).message)
    end)

    it("rejects every truncation cleanly", function()
      for n = 0, #sample - 1 do
        assert.is_false(clean(sample:sub(1, n)))
      end
      assert.is_true(clean(sample))
    end)

    it("rejects trailing bytes", function()
      assert.matches("trailing bytes", err_of(des, ser(1) .. "x").message)
    end)

    it("survives mutated bytes", function()
      math.randomseed(42)
      for _ = 1, 3000 do
        local pos = math.random(5, #sample)
        local s = sample:sub(1, pos - 1) .. string.char(math.random(0, 255)) .. sample:sub(pos + 1)
        clean(s)
      end
    end)

    it("survives random bytes", function()
      math.randomseed(7)
      for _ = 1, 3000 do
        local t = {}
        for i = 1, math.random(0, 64) do t[i] = string.char(math.random(0, 255)) end
        clean("\27PP\1" .. table.concat(t))
      end
    end)

    it("does not allocate for sizes the input cannot hold", function()
      -- a table claiming 4 billion entries, and a string claiming 2^60 bytes
      assert.matches("table size exceeds", err_of(des, "\27PP\1\1\11\255\255\255\255\0\0\0\0").message)
      assert.matches("truncated", err_of(des, "\27PP\1\1\10\0\0\0\0\0\0\0\16").message)
      assert.matches("value count exceeds", err_of(des, "\27PP\1\255\255\255\255\15").message)
    end)

    it("fails cleanly on hostile deep nesting", function()
      local s = "\27PP\1\1" .. ("\11\1\0\0\0\0\0\0\0"):rep(200000)
      local e = err_of(des, s)
      assert.is_true(procpool.is_error(e, "SerializationError"))
    end)

    it("rejects references to objects not yet decoded", function()
      assert.matches("bad reference", err_of(des, "\27PP\1\1\13\5").message)
      assert.matches("bad reference", err_of(des, "\27PP\1\1\11\1\0\0\0\0\0\0\0\13\0").message)
    end)
  end)
end)
