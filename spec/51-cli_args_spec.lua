-- The command line of `procpool` (procpool.cli's parse), without a
-- subprocess: every option and form, and the exact usage errors (main
-- reports them with a hint to --help and exits 2; 50-cli_spec.lua runs
-- them through bin/procpool).
local cli = require "procpool.cli"

local function parse(...)
  return cli.parse({ ... })
end

--- The options of `procpool map ARGS`, with the defaults filled in.
local function map_opts(t)
  t.command = "map"
  t.inputs = t.inputs or { "-" }
  return t
end

--- Assert that `procpool ARGS` is bad usage with exactly message `msg`.
local function rejects(msg, ...)
  local o, err = parse(...)
  assert.is_nil(o)
  assert.are.equal(msg, err)
end

describe("procpool's command line", function()
  describe("commands", function()
    it("is 'usage' without arguments (the usage goes to stderr, status 2)", function()
      assert.are.same({ command = "usage" }, parse())
    end)

    it("is 'help' for --help, -h and help, also after map", function()
      for _, args in ipairs({ { "--help" }, { "-h" }, { "help" }, { "map", "--help" },
        { "map", "-h" }, { "map", "s.lua", "a.txt", "--help" }, { "map", "-j", "2", "-h" } }) do
        assert.are.same({ command = "help" }, cli.parse(args), table.concat(args, " "))
      end
    end)

    it("is 'version' for --version", function()
      assert.are.same({ command = "version" }, parse("--version"))
    end)

    it("rejects an unknown command or option before the command", function()
      rejects("unknown command 'reduce' (the command is 'map')", "reduce", "s.lua")
      rejects("unknown command '' (the command is 'map')", "")
      rejects("unknown option '--frobnicate'", "--frobnicate")
      rejects("unknown option '-j'", "-j", "2", "map", "s.lua")
    end)

    it("does not change the argument list it is given", function()
      local argv = { "map", "-j4", "s.lua", "a.txt" }
      cli.parse(argv)
      assert.are.same({ "map", "-j4", "s.lua", "a.txt" }, argv)
    end)
  end)

  describe("map", function()
    it("defaults: standard input, no option set", function()
      assert.are.same(map_opts { script = "s.lua" }, parse("map", "s.lua"))
    end)

    it("takes the script, then the inputs, in order, among the options", function()
      assert.are.same(map_opts { script = "s.lua", inputs = { "a.txt", "b.txt" } },
        parse("map", "s.lua", "a.txt", "b.txt"))
      assert.are.same(map_opts { script = "s.lua", inputs = { "a.txt", "b.txt" }, jobs = 2 },
        parse("map", "-j", "2", "s.lua", "a.txt", "--jobs", "2", "b.txt"))
    end)

    it("takes '-' as an input (standard input), also between files", function()
      assert.are.same(map_opts { script = "s.lua", inputs = { "a.txt", "-", "b.txt" } },
        parse("map", "s.lua", "a.txt", "-", "b.txt"))
      assert.are.same(map_opts { script = "s.lua", inputs = { "-" } }, parse("map", "s.lua", "-"))
    end)

    it("takes everything after '--' as a file name", function()
      assert.are.same(map_opts { script = "s.lua", inputs = { "--json", "-j4", "--" } },
        parse("map", "s.lua", "--", "--json", "-j4", "--"))
      assert.are.same(map_opts { script = "-x.lua" }, parse("map", "--", "-x.lua"))
    end)

    it("-j/--jobs N: -j N, -jN, --jobs N, --jobs=N", function()
      for _, args in ipairs({ { "-j", "4" }, { "-j4" }, { "--jobs", "4" }, { "--jobs=4" } }) do
        local o = assert(cli.parse({ "map", "s.lua", table.unpack(args) }))
        assert.are.same(map_opts { script = "s.lua", jobs = 4 }, o)
        assert.are.equal("integer", math.type(o.jobs))
      end
    end)

    it("--json, --unordered, --progress and --no-progress", function()
      assert.are.same(map_opts { script = "s.lua", json = true }, parse("map", "--json", "s.lua"))
      assert.are.same(map_opts { script = "s.lua", unordered = true },
        parse("map", "s.lua", "--unordered"))
      assert.are.same(map_opts { script = "s.lua", progress = true },
        parse("map", "s.lua", "--progress"))
      assert.are.same(map_opts { script = "s.lua", progress = false },
        parse("map", "s.lua", "--no-progress"))
      -- the last one given counts
      assert.are.same(map_opts { script = "s.lua", progress = true },
        parse("map", "s.lua", "--no-progress", "--progress"))
    end)

    it("--chunksize K and --chunksize=K", function()
      assert.are.same(map_opts { script = "s.lua", chunksize = 8 },
        parse("map", "s.lua", "--chunksize", "8"))
      assert.are.same(map_opts { script = "s.lua", chunksize = 8 },
        parse("map", "s.lua", "--chunksize=8"))
    end)

    it("--timeout S, a number of seconds, whole or not", function()
      assert.are.same(map_opts { script = "s.lua", timeout = 0.5 },
        parse("map", "s.lua", "--timeout", "0.5"))
      assert.are.same(map_opts { script = "s.lua", timeout = 2 }, parse("map", "s.lua", "--timeout=2"))
      assert.are.same(map_opts { script = "s.lua", timeout = 0.001 },
        parse("map", "s.lua", "--timeout", "1e-3"))
    end)

    it("--memory SIZE, --cpu-limit S and --nice N, the workers' limits", function()
      assert.are.same(map_opts { script = "s.lua", memory = 512 * 1024 * 1024 },
        parse("map", "s.lua", "--memory", "512M"))
      assert.are.same(map_opts { script = "s.lua", memory = 2 * 1024 * 1024 * 1024 },
        parse("map", "s.lua", "--memory=2G"))
      assert.are.same(map_opts { script = "s.lua", cpu_limit = 3, nice = 10 },
        parse("map", "s.lua", "--cpu-limit", "3", "--nice=10"))
      assert.are.same(map_opts { script = "s.lua", nice = 0 }, parse("map", "s.lua", "--nice", "0"))
    end)

    it("-o/--output OUT: -o OUT, -oOUT, --output OUT, --output=OUT", function()
      for _, args in ipairs({ { "-o", "r.txt" }, { "-or.txt" }, { "--output", "r.txt" },
        { "--output=r.txt" } }) do
        assert.are.same(map_opts { script = "s.lua", output = "r.txt" },
          cli.parse({ "map", "s.lua", table.unpack(args) }))
      end
      -- an inline value may itself contain '='
      assert.are.same(map_opts { script = "s.lua", output = "a=b" }, parse("map", "s.lua", "--output=a=b"))
    end)

    it("every option at once", function()
      assert.are.same(map_opts {
        script = "s.lua", inputs = { "a.txt", "-" }, jobs = 3, json = true, unordered = true,
        chunksize = 16, timeout = 1.5, progress = false, output = "out.jsonl",
      }, parse("map", "--json", "-j3", "s.lua", "--unordered", "a.txt", "--chunksize=16",
        "--timeout", "1.5", "--no-progress", "-o", "out.jsonl", "-"))
    end)

    describe("with bad arguments", function()
      it("rejects an unknown option", function()
        rejects("unknown option '--frobnicate'", "map", "s.lua", "--frobnicate")
        rejects("unknown option '-x'", "map", "s.lua", "-x")
        rejects("unknown option '--jobs4'", "map", "s.lua", "--jobs4")
        rejects("unknown option '-h=x'", "map", "s.lua", "-h=x")
        -- before the check for the script, and even with --help
        rejects("unknown option '--bogus'", "map", "--help", "--bogus")
      end)

      it("rejects an option without its value", function()
        rejects("option --timeout needs a value", "map", "s.lua", "--timeout")
        rejects("option -j needs a value", "map", "s.lua", "-j")
        rejects("option --jobs needs a value", "map", "s.lua", "--jobs")
        rejects("option --chunksize needs a value", "map", "s.lua", "--chunksize")
        rejects("option -o needs a value", "map", "s.lua", "-o")
        rejects("option --output needs a value", "map", "s.lua", "--output")
      end)

      it("rejects a value given to a flag", function()
        rejects("option --json takes no value", "map", "s.lua", "--json=yes")
        rejects("option --unordered takes no value", "map", "s.lua", "--unordered=1")
        rejects("option --progress takes no value", "map", "s.lua", "--progress=")
        rejects("option --no-progress takes no value", "map", "s.lua", "--no-progress=x")
        rejects("option --help takes no value", "map", "s.lua", "--help=1")
      end)

      it("rejects a number that is not a whole number > 0 for -j and --chunksize", function()
        rejects("option -j: expected a whole number > 0, got '0'", "map", "s.lua", "-j", "0")
        rejects("option -j: expected a whole number > 0, got 'many'", "map", "s.lua", "-j", "many")
        rejects("option -j: expected a whole number > 0, got '-1'", "map", "s.lua", "-j-1")
        rejects("option --jobs: expected a whole number > 0, got '1.5'", "map", "s.lua", "--jobs=1.5")
        rejects("option --jobs: expected a whole number > 0, got ''", "map", "s.lua", "--jobs=")
        rejects("option -j: expected a whole number > 0, got '1e3'", "map", "s.lua", "-j", "1e3")
        rejects("option --chunksize: expected a whole number > 0, got '1.5'", "map", "s.lua",
          "--chunksize", "1.5")
        rejects("option --chunksize: expected a whole number > 0, got '0'", "map", "s.lua",
          "--chunksize=0")
      end)

      it("rejects a --timeout that is not a number > 0", function()
        rejects("option --timeout: expected a number > 0, got '-1'", "map", "s.lua", "--timeout", "-1")
        rejects("option --timeout: expected a number > 0, got '0'", "map", "s.lua", "--timeout=0")
        rejects("option --timeout: expected a number > 0, got 'abc'", "map", "s.lua", "--timeout", "abc")
        rejects("option --timeout: expected a number > 0, got 'nan'", "map", "s.lua", "--timeout", "nan")
        rejects("option --timeout: expected a number > 0, got '0/0'", "map", "s.lua", "--timeout", "0/0")
      end)

      it("rejects a bad --memory, --cpu-limit or --nice", function()
        rejects("option --memory: cannot read 'lots' as a size (e.g. \"512M\", \"2G\")", "map",
          "s.lua", "--memory", "lots")
        rejects("option --memory: '1000' is under 1M", "map", "s.lua", "--memory=1000")
        rejects("option --cpu-limit: expected a whole number > 0, got '0.5'", "map", "s.lua",
          "--cpu-limit", "0.5")
        rejects("option --nice: expected a whole number from 0 to 19, got '20'", "map", "s.lua",
          "--nice", "20")
        rejects("option --nice: expected a whole number from 0 to 19, got '-3'", "map", "s.lua",
          "--nice=-3")
        rejects("option --memory needs a value", "map", "s.lua", "--memory")
      end)

      it("rejects an empty output file name", function()
        rejects("option -o: empty file name", "map", "s.lua", "-o", "")
        rejects("option --output: empty file name", "map", "s.lua", "--output=")
      end)

      it("rejects a missing SCRIPT", function()
        local msg = "missing SCRIPT (procpool map SCRIPT.lua [INPUT ...])"
        rejects(msg, "map")
        rejects(msg, "map", "-j", "2", "--json")
        rejects(msg, "map", "--")
      end)
    end)
  end)

  it("has the usage text that --help prints", function()
    assert.matches("^Usage: procpool map SCRIPT%.lua %[INPUT %.%.%.%] %[options%]\n", cli.USAGE)
    assert.matches("\n  %-j, %-%-jobs N ", cli.USAGE)
  end)
  describe("hosts", function()
    it("takes -S (repeated, comma-separated), --slf files, --ssh and the remote options", function()
      local path = os.tmpname()
      local f = io.open(path, "w")
      f:write("# hosts\n4/node3\n")
      f:close()
      assert.are.same(map_opts {
        script = "s.lua", hosts = { "2/node1", "node2", ":", "4/node3" }, ssh = "ssh -p 2222",
        jobs = 3, remote_lua = "lua", remote_path = "inherit", host_timeout = 5,
      }, parse("map", "s.lua", "-S", "2/node1,node2", "-S:", "--slf", path, "--ssh", "ssh -p 2222",
        "-j", "3", "--remote-lua", "lua", "--remote-path", "inherit", "--host-timeout", "5"))
      os.remove(path)
      assert.are.same(map_opts { script = "s.lua", launcher = "slurm" },
        parse("map", "s.lua", "--launcher", "slurm"))
    end)

    it("refuses what does not go with hosts", function()
      rejects("option --launcher: expected ssh or slurm, got 'rsh'", "map", "s.lua", "--launcher", "rsh")
      rejects("option --ssh is for workers on hosts (-S)", "map", "s.lua", "--ssh", "ssh -p 1")
      rejects("option --ship-module is for workers on hosts (-S)", "map", "s.lua", "--ship-module", "m")
      rejects("option -S/--slf: no sshlogin given", "map", "s.lua", "-S", ",")
      rejects("option --remote-path: only 'inherit' is known, got 'x'", "map", "s.lua", "-S", ":",
        "--remote-path", "x")
      local o, err = parse("map", "s.lua", "--slf", "/nonexistent/hosts")
      assert.is_nil(o)
      assert.matches("^option %-%-slf: cannot read the sshlogin file", err)
    end)
  end)
end)
