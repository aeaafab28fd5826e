--- Word frequencies with `procpool map`: the workers count the words of
-- each line (map), procpool's own process merges the counts (reduce) and
-- writes the most frequent words (finish), one "count<TAB>word" line each.
--
-- Run it on any text:
--
--     bin/procpool map examples/wordfreq.lua book.txt -j 4
--     WORDFREQ_TOP=25 bin/procpool map examples/wordfreq.lua a.txt b.txt
--
-- or make sample text first (N lines; run directly, this file prints it):
--
--     lua5.4 examples/wordfreq.lua sample 100000 > /tmp/words.txt
--     bin/procpool map examples/wordfreq.lua /tmp/words.txt
--
-- Words are runs of ASCII letters, lowercased. WORDFREQ_TOP sets how many
-- words are written (default 10); ties are in alphabetical order.

local command, count = ...
if command == "sample" then
  -- deterministic text: a small vocabulary, frequent words more likely
  local words = {
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with",
    "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which",
    "but", "have", "an", "had", "they", "you", "were", "their", "one", "all", "we",
    "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who",
    "so", "no", "process", "pool", "worker", "lua", "record", "line",
  }
  local seed = 42
  local function rand(n) -- a small LCG: the same text everywhere
    seed = (seed * 1103515245 + 12345) % 2147483648
    return seed % n + 1
  end
  local out = {}
  for i = 1, tonumber(count) or 1000 do
    local line = {}
    for k = 1, rand(12) do
      -- squaring skews the choice towards the start of the list
      local r = rand(#words)
      local w = words[(r * r) // #words + 1] or words[r]
      line[k] = k == 1 and (w:sub(1, 1):upper() .. w:sub(2)) or w
    end
    out[#out + 1] = table.concat(line, " ") .. (i % 3 == 0 and "." or ",")
    if #out == 1000 then
      io.write(table.concat(out, "\n"), "\n")
      out = {}
    end
  end
  if #out > 0 then io.write(table.concat(out, "\n"), "\n") end
  return
end

local TOP = tonumber(os.getenv("WORDFREQ_TOP")) or 10

--- In a worker: the word counts of one line (nil for a line without words).
local function map(line)
  local counts, any = {}, false
  for word in line:lower():gmatch("[a-z]+") do
    counts[word] = (counts[word] or 0) + 1
    any = true
  end
  return any and counts or nil
end

--- In procpool's process: add one line's counts to the totals.
local function reduce(totals, counts)
  totals = totals or {}
  for word, n in pairs(counts) do totals[word] = (totals[word] or 0) + n end
  return totals
end

--- The TOP most frequent words, as lines "count<TAB>word".
local function finish(totals)
  local list = {}
  for word, n in pairs(totals or {}) do list[#list + 1] = { word = word, n = n } end
  table.sort(list, function(a, b)
    if a.n ~= b.n then return a.n > b.n end
    return a.word < b.word
  end)
  local lines = {}
  for i = 1, math.min(TOP, #list) do lines[i] = list[i].n .. "\t" .. list[i].word end
  return lines
end

return { map = map, reduce = reduce, finish = finish }
