-- The `limits` option: memory, CPU time, open files and niceness of the
-- workers; a greedy task fails by name and the pool goes on.
local procpool = require "procpool"
local core = require "procpool.core"
local H = require "spec.helper"

local T = 30
-- under ASan or valgrind everything is slower, and ASan's shadow memory
-- is address space: the address-space backstop is not set there
local SANITIZED = os.getenv("PROCPOOL_SANITIZED") ~= nil

-- a task that allocates until something stops it (256 KiB at a time)
local function greedy()
  local t = {}
  for i = 1, 1e9 do t[i] = ("x"):rep(262144) .. i end
  return #t
end

-- the niceness of the calling process (field 19 of /proc/self/stat)
local function niceness()
  local f = assert(io.open("/proc/self/stat"))
  local s = f:read("a")
  f:close()
  local fields = {}
  for w in s:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = w end
  return tonumber(fields[17]) -- fields[1] is field 3, the state
end

local function pid_of() return require("procpool").current_worker().pid end

describe("limits.memory", function()
  for _, ctx in ipairs { "fork", "spawn" } do
    it("fails a task that allocates past it with MemoryError naming the limit, and the pool goes on ("
      .. ctx .. ")", function()
      local ex <close> = procpool.ProcessPoolExecutor {
        max_workers = 1, context = ctx, limits = { memory = "32M" },
      }
      local before = ex:submit(pid_of):result(T)
      local e = ex:submit(greedy):exception(T)
      assert.is_true(procpool.is_error(e, "MemoryError"), tostring(e))
      assert.are.equal(32 * 1024 * 1024, e.limit)
      assert.matches("out of memory under the worker's limit of 32 MiB", e.message, 1, true)
      -- the next task succeeds, in a fresh worker; a retirement, not a loss
      assert.are.equal(42, ex:submit(function() return 42 end):result(T))
      assert.are_not.equal(before, ex:submit(pid_of):result(T))
      assert.are.equal(0, ex:stats().worker_restarts)
    end)
  end

  it("lets a task allocate what fits under it", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, limits = { memory = "64M" } }
    local n = ex:submit(function()
      local t = {}
      for i = 1, 2e5 do t[i] = ("y"):rep(64) .. i end -- about 20 MiB
      return #t
    end):result(T)
    assert.are.equal(2e5, n)
  end)

  it("counts from what the worker holds at start, not what the parent has", function()
    -- 40 MiB held by the parent, inherited by forked workers (a global:
    -- an upvalue would be sent with the task)
    local big = {}
    for i = 1, 4e5 do big[i] = ("z"):rep(64) .. i end
    rawset(_G, "spec_big", big)
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, limits = { memory = "32M" } }
    rawset(_G, "spec_big", nil)
    assert.are.equal(4e5, ex:submit(function() return #rawget(_G, "spec_big") end):result(T))
    assert.is_true(procpool.is_error(ex:submit(greedy):exception(T), "MemoryError"))
    -- sent with a task, the same table does not fit
    local e = ex:submit(function() return #big end):exception(T)
    assert.is_true(procpool.is_error(e, "MemoryError"), tostring(e))
    assert.are.equal(5, ex:submit(function() return 5 end):result(T))
  end)

  it("loses none of the tasks queued behind the greedy one", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 2, limits = { memory = "32M" } }
    local fs = { ex:submit(greedy) }
    for i = 1, 40 do fs[#fs + 1] = ex:submit(function(x) return x * 2 end, i) end
    fs[#fs + 1] = ex:submit(greedy)
    for i = 1, 40 do fs[#fs + 1] = ex:submit(function(x) return x * 3 end, i) end
    assert.is_true(procpool.is_error(fs[1]:exception(T), "MemoryError"))
    assert.is_true(procpool.is_error(fs[42]:exception(T), "MemoryError"))
    for i = 1, 40 do
      assert.are.equal(i * 2, fs[1 + i]:result(T))
      assert.are.equal(i * 3, fs[42 + i]:result(T))
    end
  end)

  it("fails the item of a map, and Pool's error_callback gets the MemoryError", function()
    local pool <close> = procpool.Pool { processes = 2, limits = { memory = "32M" } }
    local ok, err = pcall(function()
      return pool:map_async(function(x)
        if x == 3 then return greedy() end
        return x
      end, H.range(6)):get(T)
    end)
    assert.is_false(ok)
    assert.is_true(procpool.is_error(err, "MemoryError"), tostring(err))
    local got
    local r = pool:apply_async(greedy, nil, { error_callback = function(e) got = e end })
    assert.is_false(select(1, pcall(r.get, r, T)))
    assert.is_true(procpool.is_error(got, "MemoryError"))
    local r3 = pool:map_async(function(x) return x end, { 1, 2, 3 }):get(T)
    assert.are.same({ 1, 2, 3 }, { r3[1], r3[2], r3[3] })
  end)

  it("also bounds what C code and child processes may map (address space)", function()
    if SANITIZED then return pending("ASan's shadow memory is address space: no backstop") end
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, limits = { memory = "64M" } }
    local kib = ex:submit(function()
      local p = io.popen("sh -c 'ulimit -v'")
      local s = p:read("a")
      p:close()
      return tonumber(s)
    end):result(T)
    assert.is_number(kib)
    assert.is_true(kib > 64 * 1024 and kib < 4 * 1024 * 1024, tostring(kib))
  end)
end)

describe("limits.cpu", function()
  it("stops a task past its CPU seconds with WorkerLost naming the limit; the pool goes on",
    function()
      local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, limits = { cpu = 1 } }
      local e = ex:submit(function() while true do end end):exception(T)
      assert.is_true(procpool.is_error(e, "WorkerLost"), tostring(e))
      assert.matches("CPU time limit of 1 s", e.reason, 1, true)
      assert.matches("CPU time limit", e.message, 1, true)
      assert.are.equal(24, e.signal) -- SIGXCPU
      assert.are.equal(7, ex:submit(function() return 7 end):result(T))
    end)

  it("gives each task its own budget (a worker's total may exceed it)", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, limits = { cpu = 1 } }
    local spin = function()
      local c0 = os.clock()
      while os.clock() - c0 < 0.45 do end
      return require("procpool").current_worker().pid
    end
    local pids = {}
    for i = 1, 4 do pids[i] = ex:submit(spin):result(T) end
    for i = 2, 4 do assert.are.equal(pids[1], pids[i]) end -- 1.8 s of CPU in one worker
  end)

  it("is enforced in the spawn context too", function()
    local ex <close> = procpool.ProcessPoolExecutor {
      max_workers = 1, context = "spawn", limits = { cpu = 1 },
    }
    local e = ex:submit(function() while true do end end):exception(T)
    assert.is_true(procpool.is_error(e, "WorkerLost"), tostring(e))
    assert.matches("CPU time limit", e.reason, 1, true)
  end)
end)

describe("limits with captured output", function()
  it("keep what a task printed before it ran out of memory or CPU time", function()
    local ex <close> = procpool.ProcessPoolExecutor {
      max_workers = 1, output = "capture", limits = { memory = "32M", cpu = 1 },
    }
    local f = ex:submit(function()
      print("eating")
      io.stdout:flush()
      return greedy()
    end)
    assert.is_true(procpool.is_error(f:exception(T), "MemoryError"))
    assert.are.equal("eating\n", (f:output(T)))
    f = ex:submit(function()
      io.stderr:write("spinning\n")
      while true do end
    end)
    local e = f:exception(T)
    assert.matches("CPU time limit", e.reason, 1, true)
    assert.are.equal("spinning\n", select(2, f:output(T)))
  end)
end)

describe("limits.nofile and limits.nice", function()
  it("bound the files a task can open", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, limits = { nofile = 24 } }
    local opened, err = ex:submit(function()
      local fs, n, why = {}, 0, nil
      while n < 100 do
        local f, e = io.open("/dev/null")
        if not f then
          why = e
          break
        end
        n = n + 1
        fs[n] = f
      end
      for _, f in ipairs(fs) do f:close() end
      return n, why
    end):result(T)
    assert.is_true(opened > 0 and opened < 24, tostring(opened))
    assert.matches("Too many open files", err, 1, true)
  end)

  it("make the workers nicer by n", function()
    local mine = niceness()
    local want = math.min(19, mine + 5)
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1, limits = { nice = 5 } }
    assert.are.equal(want, ex:submit(niceness):result(T))
    local sp <close> = procpool.ProcessPoolExecutor {
      max_workers = 1, context = "spawn", limits = { nice = 5 },
    }
    assert.are.equal(want, sp:submit(niceness):result(T))
  end)
end)

describe("bad limits", function()
  local cases = {
    { "not a table", "limits must be a table" },
    { { memroy = "1G" }, "unknown limit 'memroy' to 'ProcessPoolExecutor'" },
    { { memory = "12Q" }, "limits.memory: cannot read '12Q' as a size" },
    { { memory = -5 }, "limits.memory: a size cannot be negative" },
    { { memory = 1000 }, "limits.memory must be at least 1M" },
    { { cpu = 0.5 }, "limits.cpu must be a whole number of seconds >= 1" },
    { { cpu = 0 }, "limits.cpu must be a whole number of seconds >= 1" },
    { { nofile = 3 }, "limits.nofile must be an integer >= 16" },
    { { nice = 20 }, "limits.nice must be an integer from 0 to 19" },
    { { nice = -1 }, "limits.nice must be an integer from 0 to 19" },
  }
  for _, c in ipairs(cases) do
    it("rejects " .. c[2] .. " before starting anything", function()
      local kids = #H.children()
      local ok, err = pcall(procpool.ProcessPoolExecutor, { max_workers = 1, limits = c[1] })
      assert.is_false(ok)
      assert.matches(c[2], tostring(err), 1, true)
      assert.are.equal(kids, #H.children())
    end)
  end

  it("rejects nofile above the hard limit, and the same checks apply to Pool", function()
    local _, hard = core.rlimit_nofile()
    if hard ~= math.huge then
      local ok, err = pcall(procpool.ProcessPoolExecutor, { limits = { nofile = hard + 1 } })
      assert.is_false(ok)
      assert.matches("above this process's hard limit", tostring(err), 1, true)
    end
    local ok, err = pcall(procpool.Pool, { processes = 1, limits = { cpu = "1" } })
    assert.is_false(ok)
    assert.matches("limits.cpu must be a whole number", tostring(err), 1, true)
  end)
end)

describe("WorkerLost's reason", function()
  it("says how the worker ended, in a few words", function()
    local ex <close> = procpool.ProcessPoolExecutor { max_workers = 1 }
    local e = ex:submit(function() os.execute("kill -9 $PPID") end):exception(T)
    assert.are.equal("killed by signal 9, SIGKILL", e.reason)
    e = ex:submit(function() os.exit(3) end):exception(T)
    assert.are.equal("exit code 3", e.reason)
  end)
end)
