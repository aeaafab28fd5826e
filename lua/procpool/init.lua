--- procpool: process pools for Lua 5.4.
-- @module procpool
local core = require "procpool.core"

local M = {}

M.VERSION = "0.1.0"

--- Serialize any number of values into one string.
-- @function serialize
M.serialize = core.serialize

--- Deserialize a string made by `serialize`; returns the values.
-- @function deserialize
M.deserialize = core.deserialize

--- True if `e` is a procpool error object (of name `name`, if given).
-- @function is_error
M.is_error = core.is_error

return M
