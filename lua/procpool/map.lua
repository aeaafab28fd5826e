--- procpool.map: the one chunk pipeline behind every lazy map.
--
-- Items go to an executor in chunks (one job per chunk, the function sent
-- once with it), a bounded number of them ahead of the consumer, and their
-- results come back item by item as they arrive: in input order, or as
-- the chunks deliver them. `Executor:map`/`starmap` and `Pool:imap`/
-- `imap_unordered` iterate it (`iterate`); the `procpool map` command
-- (procpool.cli) drives it step by step (`pipeline`), as it waits for
-- its standard input and for results together.
--
--     local p = map.pipeline(ex, fn, opts)
--
-- `opts` (all optional):
--
-- * `star`: each item is a table of arguments;
-- * `task_timeout`: each task's deadline, in seconds;
-- * `chunksize`: items per chunk; by default chosen per chunk from the
--   executor's observed time per item, `chunk_ns // item_ns` (1 before
--   any item was timed) within `1..max_chunk`, and no more than
--   `ceil(len / (4 * workers))` when `len` is known; `chunk_ns` defaults
--   to 2 ms of work, `max_chunk` to 4096;
-- * `len`: the input's length, when known;
-- * `buffersize`: items read whose results are not taken yet, at most
--   (rounded up to a whole chunk); by default `4 * workers * chunksize`;
-- * `unordered`: `take` hands out any chunk that is done (by default
--   only the first chunk, so results come in input order);
-- * `step`: called as `step(n, first)` when the n results from input
--   index `first` on are taken (progress);
-- * `capture`: true or false, each task's output is captured or not (by
--   default as the executor's `output`); `on_output`: see below.
-- * `listen`: called as `listen(i, ...)` with each report of input item
--   i (`procpool.report(...)` in its task), during the waits (otherwise
--   the items' reports are dropped in the engine, at no cost here).
--
-- `p.fill(src, tag) -> n, why[, err]` reads items while there is room
-- and submits them in chunks: a chunk goes when it is full, when `src`
-- has nothing more for now, and at its end, so no item read is held back.
-- `src` is a function, `src() -> true, item` (any value), `false` when
-- nothing is available right now (a non-blocking source), or nil at the
-- end; or a sequence table, read from its item `p.read() + 1` to `len`,
-- whose chunks are ranges of it (not copies). Every chunk carries `tag`.
-- `n` is the number of items read, `why` says why it stopped: "full"
-- (no room left), "blocked" (`src` returned false), "ended", or "failed"
-- with `err`, the executor's refusal of a chunk (shut down or broken; that
-- chunk's items are lost). An item that cannot be serialized is a failed
-- item of its own (its `SerializationError` is its result); the rest of
-- its chunk still goes.
--
-- `p.take() -> base, n, values, failures, tag` hands out the results of
-- the first chunk once it is done (or, `unordered`, of the first chunk
-- that is done), without waiting: input item `base + k`, for k = 1..n,
-- returned `values[k]` (its first value), or failed with `failures[k][1]`
-- (`failures` is nil when none failed). Nothing when no such chunk is
-- done. (The iterators take single items as they arrive instead.) With
-- capture, a sixth value: `outputs[k] = { stdout, stderr }`.
--
-- The iterators hand a captured item's output to `on_output(index,
-- stdout, stderr)` (procpool.output's grouped writer by default) as they
-- take its result, before they yield it or raise its error.
--
-- `p.pending()` counts the items read whose results are not taken (0:
-- nothing in flight); `p.read()` the items read; `p.cancel()` cancels
-- every chunk in flight and forgets them.
--
-- An owner that waits itself polls `ex:pollfd()`, readable once a chunk
-- has ended (then `ex:poll(0)`), beside its other fds, and calls `fill`
-- and `take` again; the iterators wait with `core.await` on an item.
--
--     for i, v in map.iterate(ex, fn, iterable, opts, star, fname, mode,
--       task_timeout) do ... end
--
-- is the loop of `Executor:map`/`starmap` (mode "stop"), `Pool:imap`
-- ("continue") and `imap_unordered` ("unordered"): it checks the
-- arguments of the public call `fname` (`opts`: timeout, chunksize,
-- buffersize, progress) and yields `i, value` as the results arrive,
-- raising an item's error at its position.
--
-- Most items are handed out by a C cursor (`core.map_cursor`,
-- src/cursor.c), which is then the generic-for iterator: armed on a
-- chunk, it returns the chunk's items one per call, decoding a done
-- chunk's results from its future, or handing out the rest of a run
-- decoded here, and calls back into the pipeline (`resume`) for the rest
-- (the next chunk, waits, failures, each chunk's last item). On
-- imap_unordered of 200 000 no-ops (chunksize 1000) that is 1.7-2.5x
-- the items per second of the Lua iterators alone.
-- With progress or captured output, which do something per item, the
-- Lua iterators run alone, taking an item already decoded on a fast path
-- inlined in them (a shared helper measured 10-20% slower). So the
-- pipeline's state is upvalues of one constructor, `new`, which builds
-- the iterators too.
-- @module procpool.map
local core = require "procpool.core"
local check = require "procpool.check"
local progress = require "procpool.progress"
local output = require "procpool.output"

local M = {}

local await, is_error = core.await, core.is_error
local raise, check_opts, deadline_of, is_int, check_fn, items_of =
  check.raise, check.check_opts, check.deadline_of, check.is_int, check.check_fn, check.items_of

--- The options every map call takes about its items (`progress`,
-- `output`, `on_output`, `on_report`), added to a call's own option set
-- `t` (modified and returned): one list for Executor:map and all of Pool's
-- maps.
function M.with_item_opts(t)
  t.progress, t.output, t.on_output, t.on_report = true, true, true, true
  return t
end

local ITERATE_OPTS = M.with_item_opts { timeout = true, chunksize = true, buffersize = true }

-- The pipeline over `ex` for `fn` with options `o` (see the header); with
-- `it`, the iteration's own part, it returns the generic-for iterator of
-- `iterate` instead: `it.source` (the input table) or `it.next` (an
-- items_of function), `it.mode`, `it.deadline`, `it.fname`, `it.timeout`,
-- `it.finish` (progress).
local function new(ex, fn, o, it)
  local star, task_timeout, step, listen = o.star, o.task_timeout, o.step, o.listen
  local cs_fixed, bs_fixed, len = o.chunksize, o.buffersize, o.len
  local chunk_ns, max_chunk = o.chunk_ns or 2000000, o.max_chunk or 4096
  local nw = ex:_nworkers()
  local capture = o.capture
  if capture == nil then capture = ex:_capture() end
  local emit = capture and it and output.emitter(o.on_output) -- an item's output, as it is taken
  -- chunks in input order: { fut, n, pos (items taken), base (input index
  -- before its first), values, failed, upto (items decoded), tag }; a chunk
  -- whose item could not be sent has no fut and fails at its position
  local chunks, head, tail = {}, 1, 0
  local ahead, nread = 0, 0

  local function chunksize()
    if cs_fixed then return cs_fixed end
    local ns = ex:_item_ns()
    local cs = ns == 0 and 1 or math.max(1, math.min(max_chunk, chunk_ns // ns))
    if len then cs = math.max(1, math.min(cs, -(-len // (4 * nw)))) end
    return cs
  end

  local function push(c)
    tail = tail + 1
    chunks[tail] = c
    nread = nread + c.n
    ahead = ahead + c.n
  end

  -- Submit items[lo..hi] (input positions base+1..); an item that cannot
  -- be serialized becomes a failed chunk of its own, the others still go.
  -- Returns the executor's refusal (it takes no more work), if any.
  local function submit(items, lo, hi, base, tag)
    local ok, fut = pcall(ex._submit_chunk, ex, fn, items, lo, hi, star, task_timeout, base,
      listen and function(_, k, ...) listen(base + k, ...) end, capture)
    if ok then
      push({ fut = fut, n = hi - lo + 1, pos = 0, base = base, tag = tag })
    elseif core.is_interrupt(fut) then
      error(fut, 0) -- Ctrl-C: now, not as the end of the input
    elseif not is_error(fut, "SerializationError") then
      return fut
    elseif lo == hi then
      push({ n = 1, pos = 0, base = base, failed = { { fut } }, values = {}, upto = 1, tag = tag })
    else
      for k = lo, hi do
        local err = submit(items, k, k, base + (k - lo), tag)
        if err then return err end
      end
    end
  end

  local function fill(src, tag)
    local n0 = nread
    local whole = type(src) == "table"
    while true do
      local cs = chunksize()
      if ahead >= (bs_fixed or 4 * nw * cs) then return nread - n0, "full" end
      if whole then
        local k = math.min(cs, len - nread)
        if k <= 0 then return nread - n0, "ended" end
        local err = submit(src, nread + 1, nread + k, nread, tag)
        if err then return nread - n0, "failed", err end
      else
        local items, k = {}, 0
        local has, v
        while k < cs do
          has, v = src()
          if not has then break end
          k = k + 1
          items[k] = v
        end
        if k > 0 then
          local err = submit(items, 1, k, nread, tag)
          if err then return nread - n0, "failed", err end
        end
        if has == false then return nread - n0, "blocked" end
        if has == nil then return nread - n0, "ended" end
      end
    end
  end

  local function cancel()
    for i = head, tail do
      local c = chunks[i]
      if c and c.fut then c.fut:cancel() end
      chunks[i] = nil
    end
    head, tail = 1, 0
  end

  -- whether the chunk's next item can be taken without waiting
  local function ready(c)
    if c.upto and c.pos < c.upto then return true end
    local f = c.fut
    return f:done() or f:_item_ready(c.pos + 1)
  end

  -- a chunk whose results are all taken lets go of its future's memory
  -- now, while it is warm (Future:_release); with a listener, whose
  -- reports are delivered by future, it is left to the collector
  local function release(c)
    local f = c.fut
    if f and not listen then
      c.fut = nil
      f:_release()
    end
  end

  -- the first chunk whose next item is in
  local function find_ready()
    for i = head, tail do
      if ready(chunks[i]) then return chunks[i] end
    end
  end

  -- the chunk leaves the list, from anywhere in it (unordered: the list
  -- then has no holes, head stays 1)
  local function remove(c)
    for i = head, tail do
      if chunks[i] == c then
        table.remove(chunks, i)
        tail = tail - 1
        return
      end
    end
  end

  if not it then
    local unordered = o.unordered
    local p = { fill = fill, cancel = cancel }
    function p.pending() return ahead end
    function p.read() return nread end
    function p.take()
      local c
      if unordered then
        for i = head, tail do
          local x = chunks[i]
          if not x.fut or x.fut:done() then
            c = x
            table.remove(chunks, i)
            tail = tail - 1
            break
          end
        end
      else
        c = chunks[head]
        if c and c.fut and not c.fut:done() then c = nil end
        if c then
          chunks[head] = nil
          head = head + 1
        end
      end
      if not c then return nil end
      local values, failures, outputs = c.values, c.failed, nil
      if c.fut then values, failures = c.fut:_values() end
      if capture and c.fut then
        outputs = {}
        for k = 1, c.n do outputs[k] = { c.fut:_output(k) } end
      end
      release(c)
      ahead = ahead - c.n
      if step then step(c.n, c.base + 1) end
      return c.base, c.n, values, failures, c.tag, outputs
    end
    return p
  end

  ---------------------------------------------------------------------
  -- the iterators of `iterate`. mode: "stop" (raise the first error,
  -- cancel the rest), "continue" (raise an error at its position;
  -- iterating again goes on), "unordered" (yield items as their chunks
  -- deliver them, with input indices).

  local mode, d, finish = it.mode, it.deadline, it.finish
  local exhausted, closed, finished = false, false, false
  local current -- unordered: the chunk being yielded
  local input_failed, input_error -- the input raised: after what was read
  local src = it.source
  if not src then
    local nexti = it.next
    src = function()
      local okn, has, v = pcall(nexti)
      if okn then return has, v end
      if core.is_interrupt(has) then error(has, 0) end -- Ctrl-C: now
      input_failed, input_error = true, has -- raised where iteration reaches it
    end
  end

  -- When the pool takes no more work (shut down or broken), the map ends
  -- there: what was submitted is still yielded, then the error is raised
  -- once, as for an input that raises.
  local function fill_input()
    if exhausted then return end
    local _, why, err = fill(src)
    if why == "ended" then
      exhausted = true
    elseif why == "failed" then
      exhausted, input_failed, input_error = true, true, err
    end
  end

  -- Without progress or captured output, nothing is done per item but
  -- handing it out: a C cursor (core.map_cursor) is then the iterator,
  -- and hands out the items of the chunk it is armed on without a Lua
  -- call per item. It calls `resume` (below) for anything else.
  local cursor, armed, armed_to -- armed on chunk `armed`, up to its item armed_to

  local function cancel_rest()
    if finish and not finished then
      finished = true
      finish()
    end
    closed = true
    cancel()
    current = nil
    if cursor then cursor:disarm() end
    armed = nil
  end

  local function timed_out()
    cancel_rest()
    raise("TimeoutError", string.format("%s did not finish within %g seconds", it.fname,
      it.timeout))
  end

  -- the chunk's next item (it is in): results are decoded as a run of
  -- all the items that are in, the whole chunk once it is done
  local function take(c)
    local pos = c.pos + 1
    if not c.upto or pos > c.upto then
      c.values, c.failed, c.upto = c.fut:_values(pos)
      -- the reports of the items just decoded came before them: deliver
      -- them before the items are yielded
      if listen then core.drain() end
    end
    c.pos = pos
    ahead = ahead - 1
    local failed = c.failed and c.failed[pos]
    local v = c.values[pos]
    c.values[pos] = nil -- what was yielded is the caller's to keep or drop
    if step then step(1, c.base + pos) end
    if emit and c.fut then emit(c.base + pos, c.fut:_output(pos)) end
    if pos == c.n then release(c) end
    if failed then
      if mode == "stop" then cancel_rest() end
      error(failed[1], 0)
    end
    return c.base + pos, v
  end

  -- the fast path, per item: the chunk's next item when it is decoded,
  -- did not fail and is not the chunk's last (nothing else to do then);
  -- nil otherwise. It repeats take's bookkeeping inline, in step with it:
  -- a shared helper measured 10-20% slower on imap_unordered of no-ops.
  local function take_decoded(c)
    local pos = c.pos + 1
    if pos < c.n and pos <= (c.upto or 0) and not c.failed then
      c.pos = pos
      ahead = ahead - 1
      local values = c.values
      local v = values[pos]
      values[pos] = nil -- what was yielded is the caller's to keep or drop
      if step then step(1, c.base + pos) end
      return c.base + pos, v
    end
  end

  -- with captured output every item goes through take, which hands it on
  if emit then take_decoded = function() end end
  local take_item = take -- the iterators' take; take_next with the cursor

  -- take, and the cursor armed over the chunk's items after it that it can
  -- hand out (not its last): a done chunk's, from its future, decoded as
  -- they go (unless one of them needs the general decoder: then c.general),
  -- or the rest of the run that take decoded. Returns false, without
  -- taking the item, when the cursor hands it out itself.
  local function take_next(c)
    local pos, to = c.pos, c.n - 1
    if pos < to and c.fut and not c.general and (not c.upto or pos >= c.upto)
      and cursor:arm(c.fut, pos, to, c.base) then
      armed, armed_to = c, to
      -- the reports of a done chunk's items came before its end
      if listen then core.drain() end
      return false
    end
    local i, v = take(c)
    to = math.min(c.upto, to)
    if c.pos < to and not c.failed then
      cursor:arm(c.values, c.pos, to, c.base)
      armed, armed_to = c, to
    end
    return i, v
  end

  local function ordered()
    local c = chunks[head]
    if c then
      local i, v = take_decoded(c)
      if i then return i, v end
    end
    if closed then return nil end
    fill_input()
    c = chunks[head]
    if not c then
      cancel_rest()
      if input_failed then error(input_error, 0) end
      return nil
    end
    if not ready(c) and not await(c.fut, d, c.pos + 1) then timed_out() end
    if c.pos + 1 == c.n then
      chunks[head] = nil
      head = head + 1
    end
    return take_item(c)
  end

  local function unordered()
    local c = current
    if c then
      local i, v = take_decoded(c)
      if i then return i, v end
    end
    if closed then return nil end
    if not (c and c.pos < c.n and ready(c)) then
      current = nil
      fill_input()
      if head > tail then
        cancel_rest()
        if input_failed then error(input_error, 0) end
        return nil
      end
      c = find_ready()
      if not c then
        local list, pos = {}, {}
        for i = head, tail do
          list[#list + 1] = chunks[i].fut
          pos[#pos + 1] = chunks[i].pos + 1
        end
        if not await(list, d, pos) then timed_out() end
        c = find_ready()
      end
      current = c
    end
    if c.pos + 1 == c.n then remove(c) end -- its last item: the chunk leaves the list
    return take_item(c)
  end

  local iter = mode == "unordered" and unordered or ordered
  local closer = setmetatable({}, { __close = function() cancel_rest() end })
  if step or emit then return iter, nil, nil, closer end

  -- the cursor's call for what it does not do itself, with the position in
  -- its chunk it reached (nil if it was not armed): the bookkeeping of the
  -- items it handed out, then the iterator's step
  local function resume(p)
    local c = armed
    if c then
      armed = nil
      ahead = ahead - (p - c.pos)
      if p < armed_to then c.general = true end -- it stopped at an item it cannot decode
      c.pos = p
    end
    return iter()
  end
  local nexti
  cursor, nexti = core.map_cursor(resume)
  take_item = take_next
  return nexti, nil, nil, closer
end

--- The pipeline of the header: `p.fill`, `p.take`, `p.pending`, `p.read`
-- and `p.cancel` over executor `ex` for task function `fn`. The caller
-- has checked its arguments and that `ex` is running.
function M.pipeline(ex, fn, opts)
  return new(ex, fn, opts or {})
end

--- The lazy chunked map behind Executor:map/starmap and Pool:imap/
-- imap_unordered, as a generic-for iterator (to-be-closed: leaving the
-- loop cancels the rest). mode: "stop", "continue" or "unordered" (see
-- the iterators above); task_timeout: each task's deadline (Pool's imap
-- option `timeout`). It checks the arguments of the public call `fname`.
function M.iterate(ex, fn, iterable, opts, star, fname, mode, task_timeout)
  check_fn(fn, 1, fname)
  local nexti, len = items_of(iterable, 2, fname)
  local source = type(iterable) == "table" and iterable -- chunks are ranges of it
  opts = check_opts(opts, ITERATE_OPTS, fname)
  local capture = output.capture_of(opts.output, fname, 3)
  output.check_on_output(opts.on_output, 3)
  local pstep, pfinish, preport = progress.reporter(opts.progress, len, fname)
  local listen = progress.listener(opts.on_report, preport, fname)
  local d = deadline_of(opts.timeout, fname)
  local cs_fixed, bs_fixed = opts.chunksize, opts.buffersize
  if cs_fixed ~= nil and (not is_int(cs_fixed) or cs_fixed < 1) then
    error("chunksize must be >= 1.", 3)
  end
  if bs_fixed ~= nil and (not is_int(bs_fixed) or bs_fixed < 1) then
    error("buffersize must be an integer >= 1", 3)
  end
  local state, broken = ex:_state()
  if state ~= "running" then
    if broken then raise("BrokenProcessPool", broken) end
    raise("InvalidStateError", "cannot schedule new futures after shutdown")
  end
  -- a function that cannot travel fails the call, not every item
  local okfn, fnerr = pcall(core.serialize, fn)
  if not okfn then error(fnerr, 3) end
  return new(ex, fn, {
    star = star, task_timeout = task_timeout, chunksize = cs_fixed, buffersize = bs_fixed,
    len = len, step = pstep, capture = capture, on_output = opts.on_output, listen = listen,
  }, {
    source = source, next = nexti, mode = mode, deadline = d, fname = fname,
    timeout = opts.timeout, finish = pfinish,
  })
end

return M
