--- Transform JSON Lines with `procpool map --json`: each input line is an
-- order record, decoded before `map`; each result is encoded back to one
-- JSON line.
--
--     {"id": 7, "customer": "ada lovelace", "price": 2.5, "qty": 4, "tags": ["a", "b"]}
--  -> {"id": 7, "customer": "Ada Lovelace", "total": 10, "ntags": 2}
--
-- Orders with qty 0 are dropped (map returns nil: no output line); an order
-- without a numeric price or qty raises, and is reported with its line
-- number (the run goes on; the exit status is 1).
--
-- Run:
--
--     lua5.4 examples/jsonl-transform.lua sample 10000 > /tmp/orders.jsonl
--     bin/procpool map --json examples/jsonl-transform.lua /tmp/orders.jsonl

local command, count = ...
if command == "sample" then
  local names = { "ada lovelace", "alan turing", "grace hopper", "edsger dijkstra",
    "barbara liskov", "donald knuth", "frances allen", "ken thompson" }
  for i = 1, tonumber(count) or 100 do
    local tags = {}
    for k = 1, i % 4 do tags[k] = string.format("%q", "t" .. (i * k) % 10) end
    io.write(string.format('{"id": %d, "customer": "%s", "price": %.2f, "qty": %d, "tags": [%s]}\n',
      i, names[i % #names + 1], (i % 97) / 4, i % 5, table.concat(tags, ", ")))
  end
  return
end

--- "ada lovelace" -> "Ada Lovelace"
local function title(s)
  return (s:gsub("(%a)(%w*)", function(first, rest) return first:upper() .. rest end))
end

return function(order)
  if type(order) ~= "table" then error("an order must be a JSON object") end
  local price, qty = order.price, order.qty
  if type(price) ~= "number" or type(qty) ~= "number" then
    error("order " .. tostring(math.tointeger(order.id) or order.id)
      .. ": price and qty must be numbers")
  end
  if qty == 0 then return nil end
  return {
    id = order.id,
    customer = title(order.customer or ""),
    total = price * qty,
    ntags = type(order.tags) == "table" and #order.tags or 0,
  }
end
