-- luacheck configuration (make lint)
std = "lua54"
max_line_length = 120
-- a spec's description or an expected message is one string, however long
max_string_line_length = false
files["spec"] = { std = "+busted" }
files["bench/py"] = { only = {} }
-- descriptions there name the CPython test each one translates
files["spec/70-cpython_futures_spec.lua"] = { std = "+busted", max_line_length = false }
files["spec/71-cpython_pool_spec.lua"] = { std = "+busted", max_line_length = false }
