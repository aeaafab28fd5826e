-- Regression: `procpool map` could hang for good with its workers idle.
-- It kept the lines of a chunk still filling when it ran out of room
-- ahead of the output, and the room is counted in chunks whose size
-- follows the observed time per item: once items turned out slower, the
-- room shrank below the lines held back, which then waited for results
-- that could no longer come. The hang needs the slowdown to meet a chunk
-- half filled, so the run is repeated.
describe("regression: procpool map when items turn slower", function()
  it("reads and maps every line", function()
    local dir = io.popen("mktemp -d"):read("l")
    local job = dir .. "/job.lua"
    local f = io.open(job, "w")
    f:write([[
      local core = require "procpool.core"
      return function(line)
        local n = tonumber(line)
        if n > 20000 and n <= 20600 then -- a stretch of slower items
          local t = core.monotonic() + 0.002
          while core.monotonic() < t do end
        end
        return line
      end
    ]])
    f:close()
    local counts = {}
    for k = 1, 4 do
      local p = io.popen("seq 1 100000 | timeout 15 bin/procpool map -j 2 " .. job .. " | wc -l")
      counts[k] = p:read("n")
      p:close()
    end
    os.execute("rm -rf " .. dir)
    assert.are.same({ 100000, 100000, 100000, 100000 }, counts)
  end)
end)
