-- Every ```lua block in README.md and docs/*.md runs, in a fresh lua5.4,
-- and prints what its `-->` comments say. A block that starts with
-- "-- no-run" is only compiled (e.g. one that needs a server).
local H = require "spec.helper"

local build = os.getenv("PROCPOOL_BUILD") or "build"
local prelude = string.format("package.path = 'lua/?.lua;lua/?/init.lua;' .. package.path\n"
  .. "package.cpath = '%s/?.so;' .. package.cpath\n", build)

local function blocks(path)
  local f = assert(io.open(path))
  local text = f:read("a")
  f:close()
  local out = {}
  for code in text:gmatch("```lua\n(.-)```") do out[#out + 1] = code end
  return out
end

local function expected_output(code)
  local lines = {}
  for line in code:gmatch("[^\n]*") do
    local want = line:match("%-%->%s?(.*)$")
    if want then lines[#lines + 1] = want end
  end
  return lines
end

local files = { "README.md" }
local p = io.popen("ls docs/*.md 2>/dev/null")
for f in p:lines() do files[#files + 1] = f end
p:close()

describe("documentation examples", function()
  for _, file in ipairs(files) do
    for i, code in ipairs(blocks(file)) do
      it(file .. " example " .. i .. " runs", function()
        if code:match("^%-%- no%-run") then
          assert.is_truthy(load(code, "=" .. file))
          return
        end
        local ok, out, err = H.run_lua(prelude .. code, 60)
        assert.is_true(ok, "example failed:\n" .. code .. "\nstderr: " .. tostring(err))
        local want = expected_output(code)
        if #want > 0 then
          local got = {}
          for line in out:gmatch("[^\n]+") do got[#got + 1] = line:gsub("%s+$", "") end
          for k, w in ipairs(want) do
            -- tabs from print() and runs of spaces compare equal
            local norm = function(s) return (s or ""):gsub("%s+", " ") end
            assert.are.equal(norm(w), norm(got[k]), file .. " example " .. i .. " line " .. k)
          end
        end
      end)
    end
  end
end)
