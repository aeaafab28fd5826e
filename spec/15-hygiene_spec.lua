-- What a host can rely on: no signal handlers or mask changes, CLOEXEC
-- fds, only our own children reaped, clean worker environments, nesting.
local procpool = require "procpool"
local H = require "spec.helper"

local T = 10

-- A signal set from /proc/self/status, without glibc's internal signals
-- 32 and 33 (NPTL installs its SIGSETXID handler at the first
-- pthread_create; those are below SIGRTMIN and not the host's to use).
local function status_field(name)
  local f = io.open("/proc/self/status")
  local s = f:read("a")
  f:close()
  local hex = s:match(name .. ":%s*(%x+)")
  return tonumber(hex, 16) & ~(3 << 31)
end

local function fd_set()
  local set = {}
  local p = io.popen("ls /proc/" .. H.pid() .. "/fd")
  for fd in p:lines() do set[tonumber(fd)] = true end
  p:close()
  return set
end

local function fd_flags(fd)
  local f = io.open("/proc/" .. H.pid() .. "/fdinfo/" .. fd)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("flags:%s*(%d+)"), 8)
end

describe("host hygiene", function()
  after_each(function()
    collectgarbage()
    collectgarbage()
  end)

  it("installs no signal handlers and leaves the signal mask alone", function()
    local caught, blocked, ignored = status_field("SigCgt"), status_field("SigBlk"),
      status_field("SigIgn")
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    for i = 1, 4 do ex:submit("spec.tasks.add", i, i):result(T) end
    assert.are.equal(caught, status_field("SigCgt"))
    assert.are.equal(blocked, status_field("SigBlk"))
    assert.are.equal(ignored, status_field("SigIgn"))
    ex:shutdown()
    assert.are.equal(caught, status_field("SigCgt"))
    assert.are.equal(blocked, status_field("SigBlk"))
  end)

  it("opens every fd close-on-exec", function()
    local before = fd_set()
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    local f = ex:submit("spec.tasks.add", 1, 1)
    f:pollfd()
    f:result(T)
    local new = 0
    for fd in pairs(fd_set()) do
      if not before[fd] then
        local flags = fd_flags(fd)
        if flags then -- (the listing's own pipe is gone by now)
          new = new + 1
          assert.are_not.equal(0, flags & 0x80000, "fd " .. fd .. " lacks O_CLOEXEC")
        end
      end
    end
    assert.is_true(new >= 3)
    ex:shutdown()
  end)

  it("reaps only its own children", function()
    local p = io.popen("sleep 0.3; echo hi; exit 3")
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    for i = 1, 4 do ex:submit("spec.tasks.sleep", 0.1, i):result(T) end
    ex:shutdown()
    assert.are.equal("hi\n", p:read("a"))
    local ok, how, code = p:close()
    assert.is_nil(ok)
    assert.are.equal("exit", how)
    assert.are.equal(3, code)
  end)

  it("gives workers /dev/null as stdin and none of the parent's other fds", function()
    local keep = io.open("/proc/self/stat") -- an fd the parent holds open
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    local line, nfds = ex:submit(function()
      local n = 0
      for _ in io.popen("ls /proc/self/fd"):lines() do n = n + 1 end
      return io.read("l"), n
    end):result(T)
    ex:shutdown()
    keep:close()
    assert.is_nil(line)
    -- 0, 1, 2, the channel, and the listing's own pipe/dir fds
    assert.is_true(nfds <= 6, nfds .. " fds open in the worker")
  end)

  it("runs nested pools inside a task", function()
    local ex = procpool.ProcessPoolExecutor { max_workers = 2 }
    local r = ex:submit(function(n)
      local pp = require "procpool"
      local inner = pp.ProcessPoolExecutor { max_workers = 2 }
      local s = 0
      for _, v in inner:map(function(x) return x * 10 end, { 1, 2, 3, 4, n }, { timeout = 10 }) do
        s = s + v
      end
      local me = pp.current_worker().pid
      local theirs = inner:submit(function() return require("procpool").current_worker().pid end):result(10)
      inner:shutdown()
      return s, me ~= theirs
    end, 5):result(T)
    ex:shutdown()
    assert.are.equal(150, r)
  end)

  it("keeps a worker's channel from a file the host dropped without closing", function()
    -- the dropped handle's fd is the first one the host opened (3); it is
    -- still garbage when the pool forks, and a worker's collection must
    -- not close that number, which is a worker's own there
    local ok, out, err = H.run_lua([[
      local procpool = require "procpool"
      collectgarbage("stop")
      do local f = io.open("/etc/hostname") end
      local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
      collectgarbage("restart")
      for _ = 1, 3 do
        local n = ex:submit(function(k)
          local t = {}
          for i = 1, k do t[i] = { i } end
          collectgarbage()
          return #t
        end, 10000):result(10)
        assert(n == 10000)
      end
      ex:shutdown()
      print("done")
    ]], 30)
    assert.is_true(ok, err)
    assert.are.equal("done\n", out)
  end)

  it("refuses to be used from a forked copy of its process", function()
    if (os.getenv("PROCPOOL_CONTEXT") or "fork") ~= "fork" then
      return pending("fork context only: spawned workers hold no copies")
    end
    local ex = procpool.ProcessPoolExecutor { max_workers = 1 }
    rawset(_G, "spec_outer_executor", ex)
    local ex2 = procpool.ProcessPoolExecutor { max_workers = 1 }
    rawset(_G, "spec_outer_executor", nil)
    local msg = ex2:submit(function()
      local ok, e = pcall(function() return _G.spec_outer_executor:submit(print) end)
      collectgarbage() -- finalizers of the copied objects must do nothing
      return ok, e
    end):result(T)
    ex2:shutdown()
    ex:shutdown()
    assert.is_false(msg)
  end)
end)
