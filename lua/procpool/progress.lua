--- procpool.progress: the `progress` option of the map-like calls.
--
-- `true` draws a bar on stderr when it is a terminal (silent otherwise); a
-- function is called as `fn(done, total)` (total nil when unknown) at
-- most every 50 ms and once at the end. docs/api.md, "Progress
-- reporting", describes what a caller sees.
-- @module procpool.progress
local core = require "procpool.core"

local M = {}

local now = core.monotonic

--- A reporter for the option `spec` of a call named `fname` over `total`
-- items (nil when unknown): returns step(n), to call as n items are done,
-- and finish(), to call once at the end; nothing when `spec` asks for no
-- report (nil, false, or true while stderr is not a terminal).
function M.reporter(spec, total, fname)
  if spec == nil or spec == false then return nil end
  local t0, last, done = now(), -1, 0
  local draw
  if spec == true then
    if not core.isatty(2) then return nil end
    draw = function(final)
      local el = now() - t0
      local rate = el > 0 and done / el or 0
      local line
      if total and total > 0 then
        local frac = math.min(1, done / total)
        local w = 30
        local fill = math.floor(frac * w)
        local eta = rate > 0 and (total - done) / rate or 0
        line = string.format("\r[%s%s] %d/%d %3d%% %.0f/s ETA %ds", ("#"):rep(fill),
          ("."):rep(w - fill), done, total, math.floor(frac * 100), rate, math.ceil(eta))
      else
        line = string.format("\r%d done, %.0f/s, %.1fs", done, rate, el)
      end
      io.stderr:write(line, final and "\n" or "")
      io.stderr:flush()
    end
  elseif type(spec) == "function" then
    draw = function() spec(done, total) end
  else
    -- level 4: the code that made the public call (which called the reporter's caller)
    error("bad progress option to '" .. fname .. "' (true or a function expected)", 4)
  end
  local function step(n)
    done = done + n
    local t = now()
    if t - last >= 0.05 then
      last = t
      draw(false)
    end
  end
  local function finish()
    draw(true)
  end
  return step, finish
end

return M
