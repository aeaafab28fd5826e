-- The `procpool map` command (bin/procpool), run as a separate process.
-- Every command runs under `timeout`, so a hang fails the test instead of
-- the suite.
local H = require "spec.helper"
local core = require "procpool.core"
local cjson = require "cjson"

local CLI = "bin/procpool"

local tmp -- a directory for this file's scripts, inputs and outputs

local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function write_file(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

local function read_file(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

--- A file in the temporary directory with `text`; returns its path.
local function file(name, text)
  return write_file(tmp .. "/" .. name, text)
end

local function lines_of(s)
  local t = {}
  for line in s:gmatch("([^\n]*)\n") do t[#t + 1] = line end
  return t
end

local function range_text(a, b)
  local t = {}
  for i = a, b do t[#t + 1] = tostring(i) end
  return table.concat(t, "\n") .. "\n"
end

local function sorted(t)
  local c = { table.unpack(t) }
  table.sort(c)
  return c
end

--- Run a shell command line under `timeout`; returns exit code, stdout,
-- stderr and the seconds it took.
local function sh(cmdline, limit)
  local errf = tmp .. "/stderr.txt"
  local t0 = core.monotonic()
  local p = io.popen(string.format("timeout %d sh -c %s 2>%s", limit or 60, q(cmdline), errf))
  local out = p:read("a")
  local _, _, code = p:close()
  return code, out, read_file(errf) or "", core.monotonic() - t0
end

--- Run `procpool ARGS` (a shell fragment); `stdin` is a shell fragment to
-- pipe in (default: no input).
local function procpool(args, stdin, limit)
  local cmd = CLI .. " " .. args
  if stdin then cmd = stdin .. " | " .. cmd else cmd = cmd .. " </dev/null" end
  return sh(cmd, limit)
end

--- Pids that no longer exist (or are zombies) within a few seconds.
local function all_gone(pids)
  return H.eventually(function()
    for _, p in ipairs(pids) do
      local st = H.proc_state(p)
      if st and st ~= "Z" then return false end
    end
    return true
  end, 5)
end

describe("procpool map", function()
  setup(function()
    local p = io.popen("mktemp -d")
    tmp = p:read("l")
    p:close()
    -- the scripts the tests share
    file("upper.lua", [[
      return function(line)
        if line == "bad" then error("bad record") end
        if line == "skip" then return nil end
        return line:upper()
      end
    ]])
    file("id.lua", "return function(line) return line end\n")
    file("pid.lua", 'return function() return require("procpool").current_worker().pid end\n')
  end)

  teardown(function()
    if tmp and tmp:match("^/tmp/") then os.execute("rm -rf " .. q(tmp)) end
  end)

  describe("output", function()
    it("writes one line per record, in input order", function()
      -- uneven work, so that records finish out of order
      local script = file("square.lua", [[
        local sleep = require("procpool.core").sleep
        return function(line)
          local n = tonumber(line)
          if n % 7 == 0 then sleep(0.01) end
          return n * n
        end
      ]])
      local input = file("nums.txt", range_text(1, 300))
      local code, out, err = procpool("map " .. script .. " " .. input .. " -j 3 --chunksize 1")
      assert.are.equal(0, code, err)
      local want = {}
      for i = 1, 300 do want[i] = tostring(i * i) end
      assert.are.same(want, lines_of(out))
      assert.are.equal("", err)
    end)

    it("--unordered writes the same lines, as they complete", function()
      local script = file("slow_first.lua", [[
        local sleep = require("procpool.core").sleep
        return function(line)
          if line == "1" then sleep(0.5) end
          return "r" .. line
        end
      ]])
      local input = file("nums20.txt", range_text(1, 20))
      local code, out, err = procpool("map " .. script .. " " .. input
        .. " --unordered -j 2 --chunksize 1")
      assert.are.equal(0, code, err)
      local got = lines_of(out)
      local want = {}
      for i = 1, 20 do want[i] = "r" .. i end
      assert.are.same(sorted(want), sorted(got))
      -- the slow first record comes out after fast ones, not first
      assert.are_not.equal("r1", got[1])
      -- and in input order without --unordered
      code, out = procpool("map " .. script .. " " .. input .. " -j 2 --chunksize 1")
      assert.are.equal(0, code)
      assert.are.same(want, lines_of(out))
    end)

    it("writes no line for a nil result", function()
      local script = file("odd.lua", [[
        return function(line)
          local n = tonumber(line)
          if n % 2 == 1 then return n end
        end
      ]])
      local code, out, err = procpool("map " .. script, "seq 1 10")
      assert.are.equal(0, code, err)
      assert.are.same({ "1", "3", "5", "7", "9" }, lines_of(out))
    end)

    it("writes numbers and booleans with tostring, and strings as they are", function()
      local script = file("kinds.lua", [[
        return function(line)
          if line == "int" then return 42 end
          if line == "float" then return 0.5 end
          if line == "bool" then return false end
          if line == "two" then return "x\ny" end
          return line
        end
      ]])
      local code, out, err = procpool("map " .. script, "printf 'int\\nfloat\\nbool\\ntwo\\n  sp  \\n'")
      assert.are.equal(0, code, err)
      assert.are.same({ "42", "0.5", "false", "x", "y", "  sp  " }, lines_of(out))
    end)

    it("reports a table result without --json as a failed record", function()
      local script = file("table.lua", "return function(line) return { line } end\n")
      local code, out, err = procpool("map " .. script, "echo a")
      assert.are.equal(1, code)
      assert.are.equal("", out)
      assert.matches("line 1: map returned a table", err)
      assert.matches("use %-%-json", err)
    end)

    it("-o OUT writes the results to a file", function()
      local out_path = tmp .. "/out.txt"
      os.remove(out_path)
      local code, out, err = procpool("map " .. tmp .. "/upper.lua -o " .. out_path, "printf 'a\\nb\\n'")
      assert.are.equal(0, code, err)
      assert.are.equal("", out)
      assert.are.equal("A\nB\n", read_file(out_path))
      code, out = procpool("map " .. tmp .. "/upper.lua --output=" .. out_path, "echo c")
      assert.are.equal(0, code)
      assert.are.equal("", out)
      assert.are.equal("C\n", read_file(out_path))
    end)
  end)

  describe("input", function()
    it("reads standard input when no INPUT is given, and for '-'", function()
      local code, out = procpool("map " .. tmp .. "/upper.lua", "printf 'a\\nb\\nc'")
      assert.are.equal(0, code)
      assert.are.equal("A\nB\nC\n", out) -- a last line without a newline is a record
      local input = file("xy.txt", "x\ny\n")
      code, out = procpool("map " .. tmp .. "/upper.lua " .. input .. " - " .. input, "echo mid")
      assert.are.equal(0, code)
      assert.are.equal("X\nY\nMID\nX\nY\n", out)
    end)

    it("reads several files in order; errors name the file and line", function()
      local a = file("a.txt", "a1\na2\n")
      local b = file("b.txt", "b1\nbad\nb3\n")
      local code, out, err = procpool("map " .. tmp .. "/upper.lua " .. a .. " " .. b)
      assert.are.equal(1, code)
      assert.are.same({ "A1", "A2", "B1", "B3" }, lines_of(out))
      assert.matches("b%.txt: line 2: [^\n]*bad record", err)
      assert.matches("1 of 5 records failed", err)
    end)

    it("reads a named FIFO to its end", function()
      local fifo = tmp .. "/fifo"
      os.remove(fifo)
      assert.are.equal(0, (sh("mkfifo " .. fifo)))
      local code, out, err = sh(string.format("(printf 'f1\\nf2\\n' > %s &); %s map %s/upper.lua %s",
        fifo, CLI, tmp, fifo), 20)
      assert.are.equal(0, code, err)
      assert.are.equal("F1\nF2\n", out)
    end)

    it("passes long lines whole, across read blocks", function()
      local script = file("len.lua", "return function(line) return #line end\n")
      local gen = [[lua5.4 -e 'print(("x"):rep(200000)) print("ab") io.write(("y"):rep(70000))']]
      local code, out, err = procpool("map " .. script, gen)
      assert.are.equal(0, code, err)
      assert.are.same({ "200000", "2", "70000" }, lines_of(out))
    end)
  end)

  describe("--json", function()
    it("decodes each line and encodes each result", function()
      local script = file("addsum.lua", [[
        return function(r)
          if r.skip then return nil end
          return { name = r.name, sum = r.a + r.b, tags = r.tags, nested = { ok = true } }
        end
      ]])
      local records = {
        { name = "ünïcode \"q\" /", a = 1, b = 2, tags = { "x", "y" } },
        { name = "two", a = 0.5, b = -3, tags = {} },
        { skip = true },
        { name = "three", a = 1e6, b = 1, tags = { "z" } },
      }
      local text = {}
      for i, r in ipairs(records) do text[i] = cjson.encode(r) end
      local input = file("records.jsonl", table.concat(text, "\n") .. "\n\n")
      local code, out, err = procpool("map --json " .. script .. " " .. input)
      assert.are.equal(0, code, err)
      local got = {}
      for _, line in ipairs(lines_of(out)) do got[#got + 1] = cjson.decode(line) end
      assert.are.equal(3, #got) -- the skipped record and the blank line write nothing
      for k, i in ipairs({ 1, 2, 4 }) do
        local r = records[i]
        assert.are.equal(r.name, got[k].name)
        assert.are.equal(r.a + r.b, got[k].sum)
        assert.are.same(r.tags, got[k].tags)
        assert.are.same({ ok = true }, got[k].nested)
      end
    end)

    it("round-trips JSON values through an identity map", function()
      local values = { '{"a":[1,2,{"b":null}],"c":"d"}', "[true,false]", '"str"', "12.5", "null" }
      local input = file("values.jsonl", table.concat(values, "\n") .. "\n")
      local code, out, err = procpool("map --json " .. tmp .. "/id.lua " .. input)
      assert.are.equal(0, code, err)
      local got = lines_of(out)
      assert.are.equal(#values, #got) -- null is cjson.null, a value: it is written
      for k = 1, #got do
        assert.are.same(cjson.decode(values[k]), cjson.decode(got[k]))
      end
    end)

    it("reports a malformed line with its line number and goes on", function()
      local input = file("broken.jsonl", '{"n":1}\n{"n":\n{"n":3}\n')
      local script = file("n.lua", "return function(r) return r.n * 10 end\n")
      local code, out, err = procpool("map --json " .. script .. " " .. input)
      assert.are.equal(1, code)
      assert.are.same({ "10", "30" }, lines_of(out))
      assert.matches("line 2: invalid JSON", err)
      assert.matches("1 of 3 records failed", err)
    end)
  end)

  describe("reduce and finish", function()
    it("reduce folds the results in the parent; finish's array is written line by line", function()
      local script = file("sum.lua", [[
        return {
          map = function(line) return tonumber(line) end,
          reduce = function(acc, v)
            assert(require("procpool").current_worker() == nil, "reduce runs in the parent")
            return (acc or 0) + v
          end,
          finish = function(acc) return { "sum " .. acc, "done" } end,
        }
      ]])
      local code, out, err = procpool("map " .. script, "seq 1 1000")
      assert.are.equal(0, code, err)
      assert.are.same({ "sum 500500", "done" }, lines_of(out))
    end)

    it("reduce sees the results in input order", function()
      local script = file("concat.lua", [[
        return {
          map = function(line) return line end,
          reduce = function(acc, v) return (acc and acc .. "," or "") .. v end,
        }
      ]])
      local code, out, err = procpool("map -j 3 --chunksize 1 " .. script, "seq 1 50")
      assert.are.equal(0, code, err)
      local want = {}
      for i = 1, 50 do want[i] = tostring(i) end
      assert.are.equal(table.concat(want, ",") .. "\n", out) -- without finish, acc is written
    end)

    it("writes a non-array final table as one JSON value with --json", function()
      local script = file("count.lua", [[
        return {
          map = function(r) return r.k end,
          reduce = function(acc, k) acc = acc or {} acc[k] = (acc[k] or 0) + 1 return acc end,
        }
      ]])
      local code, out, err = procpool("map --json " .. script,
        [[printf '{"k":"a"}\n{"k":"b"}\n{"k":"a"}\n']])
      assert.are.equal(0, code, err)
      local got = lines_of(out)
      assert.are.equal(1, #got)
      assert.are.same({ a = 2, b = 1 }, cjson.decode(got[1]))
    end)

    it("reports a raising reduce with the record's line", function()
      local script = file("badreduce.lua", [[
        return {
          map = function(line) return line end,
          reduce = function(acc, v) if v == "3" then error("no threes") end return (acc or 0) + 1 end,
        }
      ]])
      local code, out, err = procpool("map " .. script, "seq 1 5")
      assert.are.equal(1, code)
      assert.are.equal("4\n", out)
      assert.matches("line 3: reduce: [^\n]*no threes", err)
    end)

    it("reports a raising finish; exit 1", function()
      local script = file("badfinish.lua", [[
        return { map = function(l) return l end, finish = function() error("cannot finish") end }
      ]])
      local code, out, err = procpool("map " .. script, "seq 1 3")
      assert.are.equal(1, code)
      assert.are.equal("1\n2\n3\n", out) -- without reduce, results are written
      assert.matches("finish: [^\n]*cannot finish", err)
    end)
  end)

  describe("workers", function()
    it("runs init once in each worker, before its records", function()
      local log = tmp .. "/init.log"
      os.remove(log)
      local script = file("init.lua", string.format([[
        local ready
        return {
          init = function()
            ready = require("procpool").current_worker().pid
            local f = io.open(%q, "a")
            f:write(ready, "\n")
            f:close()
          end,
          map = function() return tostring(ready) end,
        }
      ]], log))
      local code, out, err = procpool("map -j 3 " .. script, "seq 1 300")
      assert.are.equal(0, code, err)
      local inits = lines_of(read_file(log))
      assert.are.equal(3, #inits)
      local seen = {}
      for _, p in ipairs(inits) do
        assert.is_nil(seen[p])
        seen[p] = true
      end
      local results = lines_of(out)
      assert.are.equal(300, #results)
      for _, p in ipairs(results) do assert.is_true(seen[p], "record run without init: " .. p) end
    end)

    it("a raising init stops the run with exit status 1", function()
      local script = file("badinit.lua", [[
        return { init = function() error("no database") end, map = function(l) return l end }
      ]])
      local code, out, err = procpool("map -j 2 " .. script, "seq 1 10")
      assert.are.equal(1, code)
      assert.are.equal("", out)
      assert.matches("no database", err)
    end)

    it("-j N runs N worker processes", function()
      local script = file("slowpid.lua", [[
        return function() require("procpool.core").sleep(0.05)
          return require("procpool").current_worker().pid end
      ]])
      local code, out = procpool("map -j 4 --chunksize 1 " .. script, "seq 1 40")
      assert.are.equal(0, code)
      local pids = {}
      for _, p in ipairs(lines_of(out)) do pids[p] = true end
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      assert.are.equal(4, n)
    end)

    it("leaves no worker process behind", function()
      local code, out = procpool("map -j 3 --chunksize 1 " .. tmp .. "/pid.lua", "seq 1 30")
      assert.are.equal(0, code)
      local pids = {}
      for _, p in ipairs(lines_of(out)) do pids[#pids + 1] = tonumber(p) end
      assert.is_true(#pids == 30)
      assert.is_true(all_gone(pids), "worker processes left running")
    end)
  end)

  describe("failures", function()
    it("reports a raising record with its line number; the run goes on; exit 1", function()
      local code, out, err = procpool("map " .. tmp .. "/upper.lua", "printf 'a\\nb\\nbad\\nc\\nbad\\n'")
      assert.are.equal(1, code)
      assert.are.same({ "A", "B", "C" }, lines_of(out))
      assert.matches("line 3: [^\n]*upper%.lua:2: bad record", err)
      assert.matches("line 5: [^\n]*bad record", err)
      assert.matches("2 of 5 records failed", err)
    end)

    it("--timeout stops a record that runs too long; the others are fine", function()
      local script = file("sleepy.lua", [[
        local sleep = require("procpool.core").sleep
        return function(line)
          if line == "slow" then sleep(20) end
          return require("procpool").current_worker().pid
        end
      ]])
      for _, mode in ipairs({ "", " --unordered" }) do
        local code, out, err, took = procpool("map -j 2 --timeout 0.5 " .. script .. mode,
          "printf '1\\nslow\\n3\\n4\\nslow\\n'")
        assert.are.equal(1, code)
        assert.are.equal(3, #lines_of(out))
        assert.matches("line 2: procpool%.DeadlineExceeded", err)
        assert.matches("line 5: procpool%.DeadlineExceeded", err)
        assert.matches("2 of 5 records failed", err)
        assert.is_true(took < 8, "took " .. took .. " s")
        local pids = {}
        for _, p in ipairs(lines_of(out)) do pids[#pids + 1] = tonumber(p) end
        assert.is_true(all_gone(pids))
      end
    end)

    it("--memory and --cpu-limit fail a greedy record by name; the others are fine", function()
      local script = file("greedy.lua", [[
        return function(line)
          if line == "eat" then
            local t = {}
            for i = 1, 1e9 do t[i] = ("x"):rep(262144) .. i end
          elseif line == "spin" then
            while true do end
          end
          return line
        end
      ]])
      local code, out, err = procpool("map -j 2 --memory 32M --cpu-limit 1 " .. script,
        "printf '1\\neat\\n3\\nspin\\n5\\n'")
      assert.are.equal(1, code)
      assert.are.same({ "1", "3", "5" }, lines_of(out))
      assert.matches("line 2: procpool%.MemoryError: the task ran out of memory under the worker's "
        .. "limit of 32 MiB", err)
      assert.matches("line 4: procpool%.WorkerLost: .*CPU time limit %(1 s%)", err)
      assert.matches("2 of 5 records failed", err)
    end)
  end)

  describe("Ctrl-C", function()
    it("stops the run with status 130, quietly, and leaves no worker behind", function()
      local out_path, err_path = tmp .. "/int.out", tmp .. "/int.err"
      -- its own process group, as a terminal's foreground job: SIGINT goes
      -- to procpool and to its workers alike; endless input, so the run is
      -- still going however slow or fast the machine (yes ends by SIGPIPE)
      -- SIGINT once the run has started (results are out), then 0.3 s on
      local code, out = sh(string.format("yes 7 | setsid %s map -j 2 %s > %s 2> %s & p=$!; "
        .. "for i in $(seq 300); do [ -s %s ] && break; sleep 0.1; done; sleep 0.3; "
        .. "kill -INT -$p; wait $p; echo $?", CLI, tmp .. "/pid.lua",
        out_path, err_path, out_path), 60)
      assert.are.equal(0, code)
      assert.are.equal("130", out:match("%d+"), read_file(err_path))
      local err = read_file(err_path)
      assert.matches("^procpool: interrupted\n$", err)
      local pids, seen = {}, {}
      for p in read_file(out_path):gmatch("%d+") do
        if not seen[p] then
          seen[p] = true
          pids[#pids + 1] = tonumber(p)
        end
      end
      assert.are.equal(2, #pids) -- it had started
      assert.is_true(all_gone(pids))
    end)

    it("inside reduce or finish also stops the run: status 130, not a failed record", function()
      -- lua.c's Ctrl-C raises "interrupted!" at the next call, wherever
      -- that is: here, inside the script's reduce, and inside its finish
      local script = file("intreduce.lua", [[
        return {
          map = function(line) return line end,
          reduce = function(acc, v)
            if v == "3" then error("interrupted!") end
            return (acc or 0) + 1
          end,
        }
      ]])
      local code, out, err = procpool("map " .. script, "{ yes 7 | head -n 2; echo 3; yes 7; }")
      assert.are.equal(130, code, err)
      assert.are.equal("", out)
      assert.matches("^procpool: interrupted\n$", err)
      script = file("intfinish.lua", [[
        return { map = function(l) return l end, reduce = function(a) return (a or 0) + 1 end,
          finish = function() error("interrupted!") end }
      ]])
      code, out, err = procpool("map " .. script, "seq 1 3")
      assert.are.equal(130, code, err)
      assert.are.equal("", out)
      assert.matches("^procpool: interrupted\n$", err)
    end)

    it("while the script loads also exits with status 130, quietly", function()
      local slow = tmp .. "/slow-load.lua"
      write_file(slow, "local t = os.time() + 20\nwhile os.time() < t do end\n"
        .. "return { map = function(line) return line end }\n")
      local err_path = tmp .. "/int-load.err"
      local code, out = sh(string.format("echo x | setsid %s map -j 2 %s > /dev/null 2> %s & "
        .. "p=$!; sleep 0.5; kill -INT -$p; wait $p; echo $?", CLI, slow, err_path), 60)
      assert.are.equal(0, code)
      assert.are.equal("130", out:match("%d+"), read_file(err_path))
      assert.matches("^procpool: interrupted\n$", read_file(err_path))
    end)
  end)

  describe("bad usage", function()
    local marker
    before_each(function()
      marker = tmp .. "/marker"
      os.remove(marker)
    end)

    local function bad_script(name, text)
      return file(name, text:gsub("MARKER", marker))
    end

    it("exits 2 for a script with a syntax error", function()
      local script = bad_script("syntax.lua", "return function(l)\n  return l +\nend\n")
      local code, out, err = procpool("map " .. script, "echo x")
      assert.are.equal(2, code)
      assert.are.equal("", out)
      assert.matches("syntax%.lua:3:", err)
    end)

    it("exits 2 for a script that returns the wrong type, before any work", function()
      local cases = {
        { "number.lua", "return 42", "must return a function or a table" },
        { "nomap.lua", "return { reduce = function() end }", "has no map function" },
        { "typo.lua", [[return { map = function() io.open("MARKER", "w"):close() end,
          reduse = function() end }]], "unknown field 'reduse'" },
        { "badfield.lua", [[return { map = function() io.open("MARKER", "w"):close() end,
          reduce = 5 }]], "field 'reduce' must be a function" },
        { "raises.lua", 'error("cannot start")', "cannot start" },
      }
      for _, c in ipairs(cases) do
        local code, out, err = procpool("map " .. bad_script(c[1], c[2]), "seq 1 5")
        assert.are.equal(2, code, c[1])
        assert.are.equal("", out)
        assert.matches(c[3], err, 1, true)
        assert.is_false(exists(marker), "work started for " .. c[1])
      end
    end)

    it("exits 2 for a missing script or input file, before any work", function()
      local code, out, err = procpool("map " .. tmp .. "/no-such-script.lua", "echo x")
      assert.are.equal(2, code)
      assert.are.equal("", out)
      assert.matches("no%-such%-script%.lua", err)
      local script = bad_script("marks.lua", [[return function(l) io.open("MARKER", "w"):close() return l end]])
      local good = file("good.txt", "1\n2\n")
      code, out, err = procpool("map " .. script .. " " .. good .. " " .. tmp .. "/missing.txt")
      assert.are.equal(2, code)
      assert.are.equal("", out)
      assert.matches("missing%.txt", err)
      assert.is_false(exists(marker))
    end)

    it("exits 2 for an unknown option or a bad value", function()
      local cases = {
        { "map " .. tmp .. "/id.lua --frobnicate", "unknown option '%-%-frobnicate'" },
        { "map " .. tmp .. "/id.lua -j 0", "%-j" },
        { "map " .. tmp .. "/id.lua -j many", "%-j" },
        { "map " .. tmp .. "/id.lua --chunksize 1.5", "%-%-chunksize" },
        { "map " .. tmp .. "/id.lua --timeout -1", "%-%-timeout" },
        { "map " .. tmp .. "/id.lua --timeout", "needs a value" },
        { "map " .. tmp .. "/id.lua --json=yes", "takes no value" },
        { "map", "missing SCRIPT" },
        { "reduce " .. tmp .. "/id.lua", "unknown command" },
        { "", "Usage:" },
      }
      for _, c in ipairs(cases) do
        local code, out, err = procpool(c[1], "echo x")
        assert.are.equal(2, code, c[1])
        assert.are.equal("", out)
        assert.matches(c[2], err)
      end
    end)

    it("--help prints the usage", function()
      for _, args in ipairs({ "--help", "map --help", "map -h" }) do
        local code, out = procpool(args)
        assert.are.equal(0, code)
        assert.matches("Usage: procpool map SCRIPT%.lua", out)
        assert.matches("%-%-unordered", out)
        assert.matches("finish%(acc%)", out)
      end
    end)
  end)

  describe("streaming", function()
    it("output begins before the input ends", function()
      local p = io.popen("(echo a; sleep 2; echo b) | timeout 30 " .. CLI .. " map "
        .. tmp .. "/upper.lua")
      local t0 = core.monotonic()
      local first = p:read("l")
      local t_first = core.monotonic() - t0
      local second = p:read("l")
      local t_second = core.monotonic() - t0
      p:close()
      assert.are.equal("A", first)
      assert.are.equal("B", second)
      assert.is_true(t_first < 1.2, "first line after " .. t_first .. " s")
      assert.is_true(t_second > 1.5)
    end)

    it("flushes each result while the workers are still busy", function()
      local script = file("fastslow.lua", [[
        return function(line)
          if line == "slow" then require("procpool.core").sleep(2) end
          return line
        end
      ]])
      local input = file("fastslow.txt", "fast\nslow\n")
      local p = io.popen("timeout 30 " .. CLI .. " map -j 2 --chunksize 1 " .. script .. " " .. input)
      local t0 = core.monotonic()
      local first = p:read("l")
      local t_first = core.monotonic() - t0
      assert.are.equal("slow", p:read("l"))
      p:close()
      assert.are.equal("fast", first)
      assert.is_true(t_first < 1.2, "first line after " .. t_first .. " s")
    end)

    it("keeps memory flat on 2 000 000 lines", function()
      if os.getenv("PROCPOOL_SANITIZED") then
        -- sanitizer quarantines and shadow memory make RSS meaningless here
        return pending("RSS is measured in the plain build (make test)")
      end
      local has_time = exists("/usr/bin/time")
      local function max_rss_kb(n)
        local rss_file = tmp .. "/rss"
        local cmd
        if has_time then
          cmd = string.format("seq 1 %d | /usr/bin/time -f %%M -o %s %s map %s/id.lua | wc -l",
            n, rss_file, CLI, tmp)
        else -- poll the peak (VmHWM) while it runs
          cmd = string.format("seq 1 %d | %s map %s/id.lua > %s/count & p=$!; "
            .. "while kill -0 $p 2>/dev/null; do awk '/VmHWM/ {print $2}' /proc/$p/status "
            .. "> %s.tmp 2>/dev/null && mv %s.tmp %s; sleep 0.1; done; wc -l < %s/count",
            n, CLI, tmp, tmp, rss_file, rss_file, rss_file, tmp)
        end
        local code, out, err = sh(cmd, 120)
        assert.are.equal(0, code, err)
        assert.are.equal(n, tonumber(out:match("%d+")))
        return tonumber((read_file(rss_file) or ""):match("(%d+)%s*$"))
      end
      local small = max_rss_kb(100000)
      local big = max_rss_kb(2000000)
      assert.is_number(small)
      assert.is_number(big)
      -- 20 times the input, about the same memory (a list of 2e6 lines alone is > 60 MB)
      assert.is_true(big < small + 8 * 1024, ("max RSS %d kB vs %d kB"):format(big, small))
      assert.is_true(big < 64 * 1024, ("max RSS %d kB"):format(big))
    end)
  end)

  describe("progress", function()
    local has_script = os.execute("command -v script >/dev/null 2>&1")

    --- Run a command line under a pseudo-terminal; returns what it drew.
    local function on_pty(cmdline)
      local code, out = sh("script -qec " .. q(cmdline) .. " /dev/null", 60)
      assert.are.equal(0, code)
      return out
    end

    it("draws a progress line on a terminal, with the final count", function()
      if not has_script then return pending("needs script(1)") end
      local input = file("p300.txt", range_text(1, 300))
      local drawn = on_pty(CLI .. " map " .. tmp .. "/id.lua " .. input .. " -o " .. tmp .. "/p.out")
      -- the input's size is known: the share read and an ETA come with it
      assert.matches("%] 100%% 300 records, [%d.]+/s, ETA 0s", drawn)
      assert.are.equal(range_text(1, 300), read_file(tmp .. "/p.out"))
      -- --progress draws it even when the results go to the terminal too
      drawn = on_pty(CLI .. " map --progress " .. tmp .. "/id.lua " .. input)
      assert.matches("100%% 300 records", drawn)
      -- from standard input, whose size is unknown: the count and the rate
      drawn = on_pty("cat " .. input .. " | " .. CLI .. " map --progress " .. tmp .. "/id.lua")
      assert.matches("\r300 records, [%d.]+/s", drawn)
    end)

    it("draws nothing with --no-progress, or when the results share the terminal", function()
      if not has_script then return pending("needs script(1)") end
      local input = file("p20.txt", range_text(1, 20))
      local drawn = on_pty(CLI .. " map --no-progress " .. tmp .. "/id.lua " .. input
        .. " -o " .. tmp .. "/p.out")
      assert.are.equal("", drawn)
      drawn = on_pty(CLI .. " map " .. tmp .. "/id.lua " .. input)
      assert.is_nil(drawn:find("records", 1, true))
      assert.matches("^1\r?\n2\r?\n", drawn)
    end)

    it("is silent when stderr is not a terminal, even with --progress", function()
      local input = file("p50.txt", range_text(1, 50))
      local code, out, err = procpool("map --progress " .. tmp .. "/id.lua " .. input)
      assert.are.equal(0, code)
      assert.are.equal(range_text(1, 50), out)
      assert.are.equal("", err)
    end)
  end)

  describe("examples", function()
    it("wordfreq.lua writes the most frequent words", function()
      local text = tmp .. "/words.txt"
      local code, _, err = sh("lua5.4 examples/wordfreq.lua sample 3000 > " .. text)
      assert.are.equal(0, code, err)
      -- the expected counts, computed here
      local counts = {}
      for line in io.lines(text) do
        for w in line:lower():gmatch("[a-z]+") do counts[w] = (counts[w] or 0) + 1 end
      end
      local list = {}
      for w, n in pairs(counts) do list[#list + 1] = { w, n } end
      table.sort(list, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[1] < b[1]) end)
      local want = {}
      for i = 1, 10 do want[i] = list[i][2] .. "\t" .. list[i][1] end
      local out
      code, out, err = procpool("map examples/wordfreq.lua -j 2 " .. text)
      assert.are.equal(0, code, err)
      assert.are.same(want, lines_of(out))
      code, out = sh("WORDFREQ_TOP=3 " .. CLI .. " map examples/wordfreq.lua " .. text)
      assert.are.equal(0, code)
      assert.are.same({ want[1], want[2], want[3] }, lines_of(out))
    end)

    it("jsonl-transform.lua transforms JSON records", function()
      local input = tmp .. "/orders.jsonl"
      local code, _, err = sh("lua5.4 examples/jsonl-transform.lua sample 500 > " .. input)
      assert.are.equal(0, code, err)
      local want = {}
      for line in io.lines(input) do
        local r = cjson.decode(line)
        if r.qty ~= 0 then
          want[#want + 1] = { id = r.id, total = r.price * r.qty, ntags = #r.tags,
            customer = r.customer:gsub("(%a)(%w*)", function(a, b) return a:upper() .. b end) }
        end
      end
      local out
      code, out, err = procpool("map --json examples/jsonl-transform.lua " .. input)
      assert.are.equal(0, code, err)
      local got = {}
      for _, line in ipairs(lines_of(out)) do got[#got + 1] = cjson.decode(line) end
      assert.are.equal(400, #want)
      assert.are.same(want, got)
      -- an order without a price is reported with its line
      code, out, err = procpool("map --json examples/jsonl-transform.lua",
        [[printf '{"id":1,"price":2,"qty":3}\n{"id":2,"qty":1}\n']])
      assert.are.equal(1, code)
      assert.are.equal(6, cjson.decode(lines_of(out)[1]).total)
      assert.matches("line 2: [^\n]*order 2: price and qty must be numbers", err)
    end)
  end)
end)
