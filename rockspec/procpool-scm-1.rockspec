rockspec_format = "3.0"
package = "procpool"
version = "scm-1"
source = {
  url = "git+https://github.com/procpool/procpool.git",
}
description = {
  summary = "Process pools with futures for Lua 5.4",
  detailed = [[
procpool runs Lua functions in worker processes: a ProcessPoolExecutor with
futures (concurrent.futures style) and a multiprocessing-style Pool, over a
C engine with an I/O thread per pool. Closures with upvalues travel by
value, modules and C functions by name; a crash in a task cannot take the
host down; waits yield inside coroutines (cqueues, luv, or any scheduler).
The procpool command (bin/procpool, the module procpool.cli) maps a Lua
function over lines; its --json mode needs lua-cjson, which is optional:
install it for --json.
]],
  homepage = "https://github.com/procpool/procpool",
  license = "MIT",
}
-- epoll, eventfd, memfd, pidfd and prctl: Linux only
supported_platforms = { "linux" }
-- lua-cjson is optional, for the procpool command (procpool.cli) alone:
-- its --json records need it (luarocks install lua-cjson, or Debian's
-- lua-cjson). A rockspec has no optional dependencies, so it is not in
-- `dependencies`; the specs run --json, so it is a test dependency.
dependencies = {
  "lua >= 5.4, < 5.5",
}
test_dependencies = {
  "busted",
  "lua-cjson",
}
test = {
  type = "busted",
}
build = {
  type = "builtin",
  modules = {
    ["procpool.core"] = {
      sources = {
        "src/agent.c",
        "src/bccheck.c",
        "src/buf.c",
        "src/capture.c",
        "src/channel.c",
        "src/codec.c",
        "src/cursor.c",
        "src/decode.c",
        "src/encode.c",
        "src/engine.c",
        "src/error.c",
        "src/executor.c",
        "src/fncache.c",
        "src/forkgate.c",
        "src/future.c",
        "src/hostproxy.c",
        "src/hugealloc.c",
        "src/link.c",
        "src/names.c",
        "src/proc.c",
        "src/procpool.c",
        "src/progress_cb.c",
        "src/reslimit.c",
        "src/quiet_thread.c",
        "src/report.c",
        "src/sys.c",
        "src/wait.c",
        "src/warm.c",
        "src/worker.c",
      },
      incdirs = { "src" },
      libraries = { "pthread", "dl" },
    },
    procpool = "lua/procpool/init.lua",
    ["procpool.check"] = "lua/procpool/check.lua",
    ["procpool.cli"] = "lua/procpool/cli.lua",
    ["procpool.executor"] = "lua/procpool/executor.lua",
    ["procpool.futures"] = "lua/procpool/futures.lua",
    ["procpool.hosts"] = "lua/procpool/hosts.lua",
    ["procpool.map"] = "lua/procpool/map.lua",
    ["procpool.output"] = "lua/procpool/output.lua",
    ["procpool.progress"] = "lua/procpool/progress.lua",
    ["procpool.pool"] = "lua/procpool/pool.lua",
    ["procpool.cqueues"] = "lua/procpool/cqueues.lua",
    ["procpool.luv"] = "lua/procpool/luv.lua",
  },
  install = {
    bin = {
      procpool = "bin/procpool",
    },
  },
}
