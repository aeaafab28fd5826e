-- The progress option of map, starmap, imap and imap_unordered.
local procpool = require "procpool"
local H = require "spec.helper"

local T = 10

local range = H.range

describe("progress", function()
  local ex, pool
  before_each(function()
    ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    pool = procpool.Pool { processes = 2 }
  end)
  after_each(function()
    ex:shutdown()
    pool:close()
    pool:join()
    collectgarbage()
  end)

  it("calls a function with (done, total), throttled, and once at the end", function()
    local calls = {}
    local function cb(done, total) calls[#calls + 1] = { done, total } end
    for _ in ex:map("spec.tasks.square", range(500), { progress = cb, timeout = T }) do end
    assert.is_true(#calls >= 1)
    assert.are.same({ 500, 500 }, calls[#calls])
    for k = 2, #calls do assert.is_true(calls[k][1] >= calls[k - 1][1]) end
  end)

  it("passes a nil total for iterator inputs", function()
    local i, last = 0, nil
    local gen = function() i = i + 1 if i <= 50 then return i end end
    for _ in ex:starmap(function(x) return x end, function()
      local v = gen()
      return v and { v }
    end, { progress = function(d, t) last = { d, t } end, timeout = T }) do end
    assert.are.same({ 50 }, last)
  end)

  it("works for Pool imap, imap_unordered, map and starmap", function()
    local seen = {}
    local function cb(name) return function(d, t) seen[name] = d .. "/" .. tostring(t) end end
    for _ in pool:imap("spec.tasks.square", range(40), { chunksize = 4, progress = cb("imap") }) do end
    for _ in pool:imap_unordered("spec.tasks.square", range(40), { progress = cb("unordered") }) do end
    pool:map("spec.tasks.square", range(40), { progress = cb("map") })
    pool:starmap("spec.tasks.add", { { 1, 2 }, { 3, 4 } }, { chunksize = 1, progress = cb("star") })
    assert.are.same({ imap = "40/40", unordered = "40/40", map = "40/40", star = "2/2" }, seen)
  end)

  it("draws nothing with progress = true when stderr is not a terminal", function()
    local ok, out, err = H.run_lua([[
      package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
      package.cpath = "]] .. (os.getenv("PROCPOOL_BUILD") or "build") .. [[/?.so;" .. package.cpath
      local procpool = require "procpool"
      local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
      local n = 0
      for _ in ex:map("spec.tasks.square", { 1, 2, 3 }, { progress = true }) do n = n + 1 end
      ex:shutdown()
      io.write(n)
    ]])
    assert.is_true(ok)
    assert.are.equal("3", out)
    assert.are.equal("", err)
  end)

  it("draws a bar with progress = true on a terminal", function()
    local script = os.tmpname()
    local f = io.open(script, "w")
    f:write([[
      package.path = "lua/?.lua;lua/?/init.lua;./?.lua;" .. package.path
      package.cpath = "]] .. (os.getenv("PROCPOOL_BUILD") or "build") .. [[/?.so;" .. package.cpath
      local procpool = require "procpool"
      local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
      local t = {}
      for i = 1, 200 do t[i] = i end
      for _ in ex:map("spec.tasks.square", t, { progress = true }) do end
      ex:shutdown()
    ]])
    f:close()
    -- `script` gives the child a pseudo-terminal
    local p = io.popen("timeout 30 script -qec 'lua5.4 " .. script .. "' /dev/null")
    local out = p:read("a")
    p:close()
    os.remove(script)
    assert.matches("%[#+%] 200/200 100%%", out)
  end)

  it("Pool imap takes a per-task deadline in its options table", function()
    local iter = pool:imap("spec.tasks.sleep", { 0.01, 3, 0.01 }, { timeout = 0.3 })
    local got = {}
    for _ = 1, 3 do
      local ok, i = pcall(iter)
      got[#got + 1] = ok and "ok" or i.name
    end
    assert.are.same({ "ok", "DeadlineExceeded", "ok" }, got)
  end)

  it("rejects a bad progress value", function()
    assert.has_error(function() ex:map("spec.tasks.square", { 1 }, { progress = 3 }) end)
  end)
end)
