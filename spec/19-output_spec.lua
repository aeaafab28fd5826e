-- Captured output: output = "capture" sends what a task writes to its
-- stdout and stderr back with its result (Future:output, the maps'
-- on_output, WorkerLost's fields, procpool map --group).
local procpool = require "procpool"
local core = require "procpool.core"

local T = 10 -- seconds: the timeout on every blocking call here
local CLI = "bin/procpool"

-- io.stdout replaced by a recorder while fn runs (the grouped writer
-- looks io.stdout up at each write)
local function with_stdout(fn)
  local real, got = io.stdout, {}
  io.stdout = { write = function(self, s) got[#got + 1] = s return self end, -- luacheck: ignore 122
    flush = function() end }
  local ok, err = pcall(fn)
  io.stdout = real -- luacheck: ignore 122
  if not ok then error(err, 0) end
  return table.concat(got)
end

for _, context in ipairs({ "fork", "spawn" }) do
  describe("output = \"capture\" (" .. context .. ")", function()
    local ex
    before_each(function()
      ex = procpool.ProcessPoolExecutor { max_workers = 2, context = context, output = "capture" }
    end)
    after_each(function()
      ex:shutdown()
      collectgarbage()
      collectgarbage()
    end)

    it("returns what Lua code printed, with the result", function()
      local f = ex:submit(function(x)
        print("hello", x)
        io.write("no newline")
        io.stderr:write("to stderr\n")
        return x * 2
      end, 21)
      assert.are.equal(42, f:result(T))
      local out, err = f:output(T)
      assert.are.equal("hello\t21\nno newline", out)
      assert.are.equal("to stderr\n", err)
    end)

    it("returns what child processes wrote (os.execute, io.popen)", function()
      local f = ex:submit(function()
        os.execute("echo from-sh; echo sh-err >&2")
        local p = io.popen("echo popen-err >&2; echo read-by-task")
        local r = p:read("a")
        p:close()
        return r
      end)
      assert.are.equal("read-by-task\n", f:result(T))
      local out, err = f:output(T)
      assert.are.equal("from-sh\n", out)
      assert.are.equal("sh-err\npopen-err\n", err)
    end)

    it("gives \"\" for a task that wrote nothing, and each task only its own output", function()
      local fs = {}
      for i = 1, 20 do fs[i] = ex:submit(function(k) if k % 2 == 0 then print("item " .. k) end end, i) end
      for i = 1, 20 do
        fs[i]:result(T)
        local out, err = fs[i]:output(T)
        assert.are.equal(i % 2 == 0 and ("item " .. i .. "\n") or "", out)
        assert.are.equal("", err)
      end
    end)

    it("returns the output of a task that failed", function()
      local f = ex:submit(function()
        print("before the error")
        io.stderr:write("oops\n")
        error("boom")
      end)
      assert.has_error(function() f:result(T) end)
      local out, err = f:output(T)
      assert.are.equal("before the error\n", out)
      assert.are.equal("oops\n", err)
    end)

    it("keeps the output of a task whose worker is SIGKILLed", function()
      local f = ex:submit(function()
        io.write("last words out\n")
        io.stdout:flush()
        io.stderr:write("last words err\n")
        os.execute("kill -9 $PPID")
        require("procpool.core").sleep(5)
      end)
      local ok, e = pcall(f.result, f, T)
      assert.is_false(ok)
      assert.is_true(procpool.is_error(e, "WorkerLost"))
      assert.are.equal(9, e.signal)
      assert.are.equal("last words out\n", e.stdout)
      assert.are.equal("last words err\n", e.stderr)
      local out, err = f:output(T)
      assert.are.equal("last words out\n", out)
      assert.are.equal("last words err\n", err)
      -- the replacement captures too
      local g = ex:submit(function() print("after") end)
      g:result(T)
      assert.are.equal("after\n", (g:output(T)))
    end)

    it("submit_with{output = \"inherit\"} does not capture; capture resumes after", function()
      local f = ex:submit_with({ output = "inherit" }, function() return 1 end)
      assert.are.equal(1, f:result(T))
      assert.is_nil(f:output(T))
      local g = ex:submit(function() io.write("x") return 2 end)
      assert.are.equal(2, g:result(T))
      assert.are.equal("x", (g:output(T)))
    end)

    it("hands each map item's output to on_output, as the item is taken", function()
      local seen, order = {}, {}
      local opts = { on_output = function(i, out, err)
        seen[i] = { out, err }
        order[#order + 1] = "output " .. i
      end, chunksize = 3, timeout = T }
      for i, v in ex:map(function(x) print("item " .. x) io.stderr:write("e" .. x) return x end,
        { 1, 2, 3, 4, 5, 6, 7 }, opts) do
        assert.are.equal(i, v)
        order[#order + 1] = "value " .. i
      end
      for i = 1, 7 do
        assert.are.same({ "item " .. i .. "\n", "e" .. i }, seen[i])
        assert.are.equal("output " .. i, order[2 * i - 1])
        assert.are.equal("value " .. i, order[2 * i])
      end
    end)

    it("writes a map item's output to io.stdout by default, in item order", function()
      local got = with_stdout(function()
        for _ in ex:map(function(x) print("line " .. x) return x end, { 1, 2, 3, 4 },
          { timeout = T }) do end
      end)
      assert.are.equal("line 1\nline 2\nline 3\nline 4\n", got)
    end)

    it("hands on the output of a map item that failed before raising its error", function()
      local seen = {}
      local ok = pcall(function()
        for _ in ex:map(function(x) print("x" .. x) if x == 2 then error("bad") end return x end,
          { 1, 2, 3 }, { on_output = function(i, out) seen[i] = out end, chunksize = 1,
            timeout = T }) do end
      end)
      assert.is_false(ok)
      assert.are.equal("x1\n", seen[1])
      assert.are.equal("x2\n", seen[2])
    end)
  end)
end

describe("output", function()
  after_each(function()
    collectgarbage()
    collectgarbage()
  end)

  it("is not captured by default (output = \"inherit\")", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1 }
    local f = ex:submit(function() return 1 end)
    assert.are.equal(1, f:result(T))
    assert.is_nil(f:output(T))
    for i, v in ex:map(function(x) return x end, { 1, 2 }, { on_output = error, timeout = T }) do
      assert.are.equal(i, v)
    end
  end)

  it("submit_with{output = \"capture\"} captures one task on an inheriting executor", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1 }
    local f = ex:submit_with({ output = "capture" }, function() print("mine") return 1 end)
    f:result(T)
    assert.are.same({ "mine\n", "" }, { f:output(T) })
    local g = ex:submit(function() return 2 end)
    g:result(T)
    assert.is_nil(g:output(T))
  end)

  it("map{output = \"capture\"} captures on an inheriting executor", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2 }
    local seen = {}
    for _ in ex:map(function(x) io.write(x) return x end, { "a", "b" },
      { output = "capture", on_output = function(i, out) seen[i] = out end, timeout = T }) do end
    assert.are.same({ "a", "b" }, seen)
  end)

  it("truncates at max_output per stream, with a marker naming what was dropped", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, output = "capture",
      max_output = "1K" }
    local f = ex:submit(function()
      io.write(string.rep("o", 5000))
      io.stderr:write(string.rep("e", 1030))
      os.execute("head -c 100000 /dev/zero") -- a child's output is bounded too
    end)
    f:result(T)
    local out, err = f:output(T)
    assert.are.equal(string.rep("o", 1024) .. "\n[procpool: 103976 bytes of output dropped]\n", out)
    assert.are.equal(string.rep("e", 1024) .. "\n[procpool: 6 bytes of output dropped]\n", err)
    -- the next task starts with an empty area
    local g = ex:submit(function() io.write("small") end)
    g:result(T)
    assert.are.equal("small", (g:output(T)))
  end)

  it("returns large output (a result sent in a memfd) whole", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, output = "capture" }
    local f = ex:submit(function() io.write(string.rep("z", 600000)) return "done" end)
    assert.are.equal("done", f:result(T))
    assert.are.equal(600000, #(f:output(T)))
  end)

  it("of a cancelled future raises CancelledError, as exception() does", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, output = "capture" }
    local blocker = ex:submit(function() require("procpool.core").sleep(0.3) end)
    local f = ex:submit(function() return 1 end)
    assert.is_true(f:cancel())
    local ok, e = pcall(f.output, f, T)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "CancelledError"))
    blocker:result(T)
  end)

  it("waits with a timeout, raising TimeoutError", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, output = "capture" }
    local f = ex:submit(function() require("procpool.core").sleep(0.5) end)
    local ok, e = pcall(f.output, f, 0.05)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "TimeoutError"))
    f:result(T)
  end)

  it("keeps a DeadlineExceeded task's output until it was stopped", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, output = "capture" }
    local f = ex:submit_with({ timeout = 0.3 }, function()
      io.write("started\n")
      io.stdout:flush()
      require("procpool.core").sleep(5)
    end)
    local ok, e = pcall(f.result, f, T)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(e, "DeadlineExceeded"))
    assert.are.equal("started\n", (f:output(T)))
  end)

  describe("in a Pool", function()
    local pool
    before_each(function() pool = procpool.Pool { processes = 2, output = "capture" } end)
    after_each(function()
      pool:close()
      pool:join()
    end)

    it("map writes each item's output grouped, in order, as get() delivers", function()
      local r
      local got = with_stdout(function()
        r = pool:map_async(function(x) print("p" .. x) return x * 2 end, { 1, 2, 3, 4, 5 },
          { chunksize = 2 }):get(T)
      end)
      assert.are.same({ 2, 4, 6, 8, 10, n = 5 }, r)
      assert.are.equal("p1\np2\np3\np4\np5\n", got)
    end)

    it("map_async hands outputs on before its callback, once", function()
      local seen, cb = {}, nil
      local r = pool:map_async(function(x) io.write(x) return x end, { "a", "b", "c" }, {
        on_output = function(i, out) seen[#seen + 1] = i .. out end,
        callback = function(list) cb = #seen .. ":" .. #list end,
      })
      assert.are.same({ "a", "b", "c", n = 3 }, r:get(T))
      assert.is_true(r:wait(T))
      core.drain()
      assert.are.same({ "1a", "2b", "3c" }, seen)
      assert.are.equal("3:3", cb)
    end)

    it("imap_unordered hands on each item's output with its index", function()
      local seen = {}
      for i, v in pool:imap_unordered(function(x) io.write("u" .. x) return x end, { 1, 2, 3 },
        { on_output = function(i, out) seen[i] = out end, timeout = T }) do
        assert.are.equal(i, v)
        assert.are.equal("u" .. i, seen[i])
      end
    end)

    it("map with output = \"inherit\" does not capture", function()
      local seen = 0
      local r = pool:map_async(function(x) return x end, { 1, 2 },
        { output = "inherit", on_output = function() seen = seen + 1 end }):get(T)
      assert.are.same({ 1, 2, n = 2 }, r)
      assert.are.equal(0, seen)
    end)
  end)

  describe("with bad arguments", function()
    it("rejects a bad output mode", function()
      assert.has_error(function() procpool.ProcessPoolExecutor { output = "pipe" } end,
        "output must be \"inherit\" or \"capture\", got pipe")
      assert.has_error(function() procpool.Pool { output = true } end,
        "output must be \"inherit\" or \"capture\", got true")
    end)

    it("rejects a bad max_output", function()
      assert.has_error(function() procpool.ProcessPoolExecutor { max_output = "lots" } end,
        "bad max_output: cannot read 'lots' as a size (e.g. \"512M\", \"2G\")")
      assert.has_error(function() procpool.ProcessPoolExecutor { max_output = "2G" } end,
        "max_output must be at most 1G")
    end)

    it("rejects a bad per-call output or on_output", function()
      local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1 }
      assert.has_error(function() ex:submit_with({ output = 1 }, print) end,
        "bad output to 'submit_with' (\"inherit\" or \"capture\" expected, got 1)")
      assert.has_error(function() ex:map(print, { 1 }, { output = "x" }) end,
        "bad output to 'map' (\"inherit\" or \"capture\" expected, got x)")
      assert.has_error(function() ex:map(print, { 1 }, { on_output = 5 }) end,
        "on_output must be a function(index, stdout, stderr)")
    end)
  end)
end)

describe("procpool map --group", function()
  it("writes each record's output together, before its result", function()
    local script = os.tmpname()
    local f = io.open(script, "w")
    f:write([[
      return function(line)
        io.write(line, " begins\n")
        io.stdout:flush()
        os.execute("sleep 0.05; echo " .. line .. " ends; echo " .. line .. " err >&2")
        return line .. " result"
      end
    ]])
    f:close()
    local errf = os.tmpname()
    local p = io.popen("printf 'a\\nb\\nc\\nd\\n' | timeout 60 " .. CLI .. " map " .. script
      .. " --group -j 2 --chunksize 1 2>" .. errf)
    local out = p:read("a")
    local _, _, code = p:close()
    local ef = io.open(errf)
    local err = ef:read("a")
    ef:close()
    os.remove(script)
    os.remove(errf)
    assert.are.equal(0, code)
    local want = {}
    for _, r in ipairs({ "a", "b", "c", "d" }) do
      want[#want + 1] = r .. " begins\n" .. r .. " ends\n" .. r .. " result\n"
    end
    assert.are.equal(table.concat(want), out)
    assert.are.equal("a err\nb err\nc err\nd err\n", err)
  end)

  it("is in the help", function()
    local p = io.popen("timeout 30 " .. CLI .. " map --help")
    local help = p:read("a")
    p:close()
    assert.is_truthy(help:find("--group", 1, true))
  end)
end)
