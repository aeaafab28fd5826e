-- Installing (make install, luarocks) and embedding: procpool used from
-- outside the source tree, in both contexts, and from a C host.
local H = require "spec.helper"

local build = os.getenv("PROCPOOL_BUILD") or "build"
local root
do
  local p = io.popen("pwd")
  root = p:read("l")
  p:close()
end

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok, out, code
end

-- a script run from /tmp against an installed tree
local check = [[
local procpool = require "procpool"
local out = {}
for _, ctx in ipairs({ "fork", "spawn" }) do
  local ex = procpool.ProcessPoolExecutor { max_workers = 2, context = ctx }
  local k = 10
  local v = ex:submit(function(x) return x + k end, 5):result(30)
  local w = ex:submit("string.upper", ctx):result(30)
  ex:shutdown()
  out[#out + 1] = v .. ":" .. w
end
io.write(table.concat(out, " "), " ", tostring(package.searchpath("procpool.core", package.cpath) ~= nil), "\n")
]]

describe("installing", function()
  local tmp
  before_each(function() tmp = os.tmpname() os.remove(tmp) assert(os.execute("mkdir -p " .. tmp)) end)
  after_each(function() os.execute("rm -rf " .. tmp) end)

  local function run_from_tmp(env)
    local script = tmp .. "/check.lua"
    local f = io.open(script, "w")
    f:write(check)
    f:close()
    return sh("cd /tmp && " .. env .. " timeout 60 lua5.4 " .. script)
  end

  it("make install PREFIX=... gives a working procpool, spawn context included", function()
    local ok, out = sh("make -s install PREFIX=" .. tmp .. " BUILD=" .. build)
    assert.is_true(ok, out)
    local env = string.format("LUA_PATH='%s/share/lua/5.4/?.lua;%s/share/lua/5.4/?/init.lua;;' "
      .. "LUA_CPATH='%s/lib/lua/5.4/?.so;;'", tmp, tmp, tmp)
    local ok2, out2 = run_from_tmp(env)
    assert.is_true(ok2, out2)
    assert.are.equal("15:FORK 15:SPAWN true\n", out2)
    local ok3 = sh("test -x " .. tmp .. "/bin/procpool")
    assert.is_true(ok3)
    local ok4, out4 = sh("make -s uninstall PREFIX=" .. tmp)
    assert.is_true(ok4, out4)
    assert.is_falsy((sh("test -e " .. tmp .. "/lib/lua/5.4/procpool/core.so")))
  end)

  -- every file `pattern` lists must appear in the rockspec as `entry(path)`
  local function rockspec_lists(pattern, entry)
    local f = assert(io.open("rockspec/procpool-scm-1.rockspec"))
    local spec = f:read("a")
    f:close()
    local p = io.popen("ls " .. pattern)
    local n = 0
    for path in p:lines() do
      n = n + 1
      local e = entry(path)
      assert.is_truthy(spec:find(e, 1, true), e .. " is not in the rockspec")
    end
    p:close()
    assert.is_true(n > 0)
  end

  it("has the rockspec build every C file of src/", function()
    rockspec_lists("src/*.c", function(path) return '"' .. path .. '"' end)
  end)

  it("has the rockspec install every Lua module of lua/procpool/", function()
    rockspec_lists("lua/procpool/*.lua", function(path)
      local name = "procpool" .. (path:match("/init%.lua$") and "" or "." .. path:match("([%w_]+)%.lua$"))
      return name:find(".", 1, true) and string.format('["%s"] = "%s"', name, path)
        or string.format('%s = "%s"', name, path)
    end)
  end)

  it("luarocks make installs a working procpool into a tree", function()
    if not sh("command -v luarocks") then return pending("luarocks is not installed") end
    local okl, outl = sh("luarocks --lua-version 5.4 lint rockspec/procpool-scm-1.rockspec")
    assert.is_true(okl, outl)
    local ok, out = sh("luarocks --lua-version 5.4 --tree " .. tmp
      .. " make rockspec/procpool-scm-1.rockspec")
    assert.is_true(ok, out)
    local ok2, out2 = run_from_tmp("eval \"$(luarocks --lua-version 5.4 --tree " .. tmp .. " path)\" &&")
    assert.is_true(ok2, out2)
    assert.are.equal("15:FORK 15:SPAWN true\n", out2)
    local ok3, out3 = sh("cd /tmp && eval \"$(luarocks --lua-version 5.4 --tree " .. tmp
      .. " path)\" && " .. tmp .. "/bin/procpool --help")
    assert.is_true(ok3, out3)
    assert.matches("procpool map", out3)
  end)
end)

describe("embedding", function()
  it("runs a C host's function in workers, and a second state in a second thread", function()
    local host = build .. "/embed/host"
    local ok, out = sh("test -x " .. host .. " || make -s " .. host)
    assert.is_true(ok, out)
    local ok2, out2 = sh("LUA_PATH='" .. root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;' "
      .. "LUA_CPATH='" .. root .. "/" .. build .. "/?.so;;' timeout 60 " .. host)
    assert.is_true(ok2, out2)
    assert.are.equal("main state: 1007 2007 3007 4007 | 9007\nsecond state: 42\n", out2)
    assert.are.equal(0, #H.children())
  end)
end)

describe("the demo", function()
  it("counts the same primes serially and in the pool", function()
    local ok, out = sh("LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='" .. build
      .. "/?.so;;' timeout 60 lua5.4 examples/demo.lua 400000")
    assert.is_true(ok, out)
    assert.matches("serially: +33860 primes", out)
    assert.matches("with %d+ worker process%a*: 33860 primes", out)
    assert.matches("speedup: [%d.]+x", out)
  end)
end)
