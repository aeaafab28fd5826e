-- Regression: cjson.null (a light userdata) could not be sent. Light
-- userdata reachable by name from package.loaded now travel by name.
local procpool = require "procpool"
local cjson = require "cjson"

describe("regression: cjson.null crosses", function()
  it("round-trips through serialize", function()
    local a, b = procpool.deserialize(procpool.serialize(cjson.null, { v = cjson.null }))
    assert.are.equal(cjson.null, a)
    assert.are.equal(cjson.null, b.v)
  end)

  it("goes through submit, map and the Pool", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1 }
    local rec = cjson.decode('{"a":null,"b":[1,null]}')
    local back = ex:submit(function(r) return r end, rec):result(10)
    assert.are.equal(cjson.null, back.a)
    assert.are.equal(cjson.null, back.b[2])
    for _, v in ex:map(function(r) return r.a == cjson.null end, { rec }, { timeout = 10 }) do
      assert.is_true(v)
    end
    local pool <close> = procpool.Pool { processes = 1 }
    assert.are.same({ cjson.null, n = 1 }, pool:map(function(r) return r.a end, { rec }))
  end)

  it("still refuses a light userdata that has no name", function()
    local lud = debug.upvalueid(function() return cjson end, 1)
    local ok, e = pcall(procpool.serialize, lud)
    assert.is_false(ok)
    assert.are.equal("value[1]: cannot serialize a light userdata", e.message)
  end)
end)
