-- Regression: a map over an item that cannot be serialized raised the
-- same SerializationError on every later call of its iterator, so a loop
-- that pcalls past failed items spun forever. The error is now raised
-- once, at that item's position (`item[k]: ...`); Executor:map then ends,
-- Pool:imap and imap_unordered go on with the items after it.
local procpool = require "procpool"

local co = coroutine.create(print)
local function id(x) return x end

-- every result of it(), pcall'd, until it ends (at most `max` calls)
local function drain(it, max)
  local out = {}
  for _ = 1, max do
    local r = table.pack(pcall(it))
    if r[1] and r[2] == nil then break end
    out[#out + 1] = r
  end
  return out
end

describe("regression: an item that cannot be serialized", function()
  local ex, pool
  before_each(function()
    ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    pool = procpool.Pool { processes = 2 }
  end)
  after_each(function()
    ex:shutdown { cancel_futures = true }
    pool:terminate()
    pool:join()
    collectgarbage()
    collectgarbage()
  end)

  it("ends Executor:map after raising once, at its position", function()
    local r = drain(ex:map(id, { 1, 2, co, 4 }, { chunksize = 2, timeout = 10 }), 10)
    assert.are.equal(3, #r)
    assert.are.same({ true, 1, 1, n = 3 }, r[1])
    assert.are.same({ true, 2, 2, n = 3 }, r[2])
    assert.is_false(r[3][1])
    assert.is_true(procpool.is_error(r[3][2], "SerializationError"))
    assert.are.equal("item[3]: cannot serialize a coroutine", r[3][2].message)
  end)

  it("lets Pool:imap go on after it", function()
    local r = drain(pool:imap(id, { 1, co, 3, 4 }, { chunksize = 2, timeout = 10 }), 10)
    assert.are.equal(4, #r)
    assert.are.same({ true, 1, 1, n = 3 }, r[1])
    assert.is_false(r[2][1])
    assert.are.equal("item[2]: cannot serialize a coroutine", r[2][2].message)
    assert.are.same({ true, 3, 3, n = 3 }, r[3])
    assert.are.same({ true, 4, 4, n = 3 }, r[4])
  end)

  it("lets Pool:imap_unordered go on after it", function()
    local r = drain(pool:imap_unordered(id, { 1, co, 3, 4 }, { chunksize = 2, timeout = 10 }), 10)
    assert.are.equal(4, #r)
    local got, errors = {}, 0
    for _, x in ipairs(r) do
      if x[1] then
        got[x[2]] = x[3]
      else
        errors = errors + 1
        assert.are.equal("item[2]: cannot serialize a coroutine", x[2].message)
      end
    end
    assert.are.equal(1, errors)
    assert.are.same({ [1] = 1, [3] = 3, [4] = 4 }, got)
  end)

  it("names the item by its input position for an iterator input", function()
    local items, k = { 1, 2, 3, 4, co, 6 }, 0
    local r = drain(pool:imap(id, function()
      k = k + 1
      return items[k]
    end, 2), 10)
    assert.are.equal(6, #r)
    assert.are.equal("item[5]: cannot serialize a coroutine", r[5][2].message)
    assert.are.same({ true, 6, 6, n = 3 }, r[6])
  end)

  it("fails Pool:map at the call, and the pool goes on", function()
    local ok, e = pcall(pool.map, pool, id, { 1, co, 3 })
    assert.is_false(ok)
    assert.are.equal("item[2]: cannot serialize a coroutine", e.message)
    assert.are.same({ 1, 4, n = 2 }, pool:map("spec.tasks.square", { 1, 2 }))
  end)

  it("raises a function that cannot be sent at the call", function()
    local ok, e = pcall(ex.map, ex, function() return co end, { 1 })
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "SerializationError"))
  end)
end)
