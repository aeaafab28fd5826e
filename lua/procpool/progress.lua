--- procpool.progress: the `progress` option of the map-like calls.
--
-- `true` draws a bar on stderr when it is a terminal (silent otherwise); a
-- function is called as `fn(done, total)` (total nil when unknown) at
-- most every 50 ms and once at the end. The bar also counts the items
-- still running by the fraction their tasks last reported
-- (procpool.report(x), x in [0, 1]). docs/api.md, "Progress reporting",
-- describes what a caller sees.
-- @module procpool.progress
local core = require "procpool.core"

local M = {}

local now = core.monotonic

--- A reporter for the option `spec` of a call named `fname` over `total`
-- items (nil when unknown): returns step(n, first), to call as the n
-- items from input index `first` on are done, finish(), to call once at
-- the end, and, for a bar, report(i, x, ...), to call with the reports of
-- item i (nil for a function `spec`); nothing when `spec` asks for no
-- report (nil, false, or true while stderr is not a terminal).
function M.reporter(spec, total, fname)
  if spec == nil or spec == false then return nil end
  local t0, last, done = now(), -1, 0
  local fracs -- the bar's: the running items' reported fractions, by index
  local draw
  if spec == true then
    if not core.isatty(2) then return nil end
    fracs = {}
    draw = function(final)
      local el = now() - t0
      local rate = el > 0 and done / el or 0
      local line
      if total and total > 0 then
        local part = 0
        for _, x in pairs(fracs) do part = part + x end
        local frac = math.min(1, (done + part) / total)
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
  local function throttled()
    local t = now()
    if t - last >= 0.05 then
      last = t
      draw(false)
    end
  end
  local function step(n, first)
    done = done + n
    if fracs and first and next(fracs) then
      for i = first, first + n - 1 do fracs[i] = nil end
    end
    throttled()
  end
  local function finish()
    draw(true)
  end
  local report
  if fracs then
    report = function(i, x)
      if type(x) == "number" and x >= 0 and x <= 1 then
        fracs[i] = x
        throttled()
      end
    end
  end
  return step, finish, report
end

--- The listener of a map's item reports for the options `on_report` (a
-- user's function, or nil; checked here for the call `fname`) and the
-- bar's `report` (or nil): a function(i, ...), or nil when none listens.
function M.listener(on_report, report, fname)
  if on_report ~= nil and type(on_report) ~= "function" then
    error("bad on_report option to '" .. fname .. "' (a function expected)", 4)
  end
  if not report then return on_report end
  if not on_report then return report end
  return function(i, ...)
    report(i, ...)
    on_report(i, ...)
  end
end

return M
