-- Task functions for the specs, reached by name ("spec.tasks.name") or
-- as values. Workers require this module by name when needed.
local core = require "procpool.core"
local T = {}

function T.add(a, b) return a + b end
function T.echo(...) return ... end
function T.sleep(s, v) core.sleep(s) return v end
function T.pid() return require("procpool").current_worker().pid end
function T.worker() return require("procpool").current_worker() end
function T.sleep_id(s)
  core.sleep(s)
  return require("procpool").current_worker().id
end
function T.fail(v) error(v, 0) end
function T.square(x) return x * x end
function T.global(name) return _G[name] end

--- For initializers: remember a value in the worker's globals.
function T.init(v) rawset(_G, "spec_init_value", v) end
function T.get_init() return rawget(_G, "spec_init_value") end

return T
