-- The C sources' shape: the files of src/ include each other as a DAG
-- (x.c and x.h count as one part), and the engine's parts never include
-- Lua, so the engine stays usable without a lua_State. The Lua modules of
-- lua/procpool/ require each other as a DAG too.

-- part name -> { [included part] = true }, and part -> the Lua headers it
-- includes directly
local function include_graph()
  local deps, lua = {}, {}
  local p = io.popen("ls src/*.c src/*.h")
  for path in p:lines() do
    local part = path:match("src/([%w_]+)%.[ch]$")
    deps[part] = deps[part] or {}
    local f = assert(io.open(path))
    for line in f:lines() do
      local inc = line:match('^%s*#%s*include%s+"([%w_]+)%.h"')
      if inc and inc ~= part then deps[part][inc] = true end
      if line:match("^%s*#%s*include%s+<l[ua][%w]*%.h>") then lua[part] = true end
    end
    f:close()
  end
  p:close()
  return deps, lua
end

-- a cycle as a list of parts, or nil
local function find_cycle(deps)
  local state, stack = {}, {}
  local function visit(n)
    state[n] = "open"
    stack[#stack + 1] = n
    local names = {}
    for d in pairs(deps[n] or {}) do names[#names + 1] = d end
    table.sort(names)
    for _, d in ipairs(names) do
      if state[d] == "open" then
        local cycle, on = {}, false
        for _, s in ipairs(stack) do
          if s == d then on = true end
          if on then cycle[#cycle + 1] = s end
        end
        cycle[#cycle + 1] = d
        return cycle
      elseif not state[d] then
        local c = visit(d)
        if c then return c end
      end
    end
    stack[#stack] = nil
    state[n] = "done"
  end
  local names = {}
  for n in pairs(deps) do names[#names + 1] = n end
  table.sort(names)
  for _, n in ipairs(names) do
    if not state[n] then
      local c = visit(n)
      if c then return c end
    end
  end
end

-- module name -> { [required procpool module] = true }, for the Lua files
-- of lua/procpool/ (every require, also one inside a function)
local function require_graph()
  local deps = {}
  local p = io.popen("ls lua/procpool/*.lua")
  for path in p:lines() do
    local base = path:match("([%w_]+)%.lua$")
    local name = base == "init" and "procpool" or "procpool." .. base
    deps[name] = deps[name] or {}
    local f = assert(io.open(path))
    local text = f:read("a")
    f:close()
    for req in text:gmatch("require%s*%(?%s*[\"']([%w_.]+)[\"']") do
      if (req == "procpool" or req:match("^procpool%.")) and req ~= name then deps[name][req] = true end
    end
  end
  p:close()
  return deps
end

describe("source layout", function()
  it("finds a cycle when there is one (the check itself)", function()
    local c = find_cycle { a = { b = true }, b = { c = true }, c = { a = true } }
    assert.are.same({ "a", "b", "c", "a" }, c)
    assert.is_nil(find_cycle { a = { b = true }, b = { c = true }, c = {} })
  end)

  it("has no include cycle among the files of src/", function()
    local deps = include_graph()
    assert.is_truthy(deps.engine, "src/engine.c was not read")
    local c = find_cycle(deps)
    assert.is_nil(c, c and ("include cycle: " .. table.concat(c, " -> ")))
  end)

  it("has no require cycle among the Lua modules of lua/procpool/", function()
    local deps = require_graph()
    assert.is_truthy(deps.procpool and deps["procpool.map"], "lua/procpool/ was not read")
    assert.is_truthy(deps.procpool["procpool.executor"])
    local c = find_cycle(deps)
    assert.is_nil(c, c and ("require cycle: " .. table.concat(c, " -> ")))
  end)

  it("keeps Lua out of the engine and what it includes", function()
    local deps, lua = include_graph()
    local seen = {}
    local function reach(n)
      if seen[n] then return end
      seen[n] = true
      for d in pairs(deps[n] or {}) do reach(d) end
    end
    reach("engine")
    for n in pairs(seen) do
      assert.is_falsy(lua[n], "src/" .. n .. " (reached from the engine) includes a Lua header")
    end
    assert.is_true(seen.channel and seen.buf and true or false)
  end)
end)
