"""Every Lua script of the batch store, each headed by its KEYS/ARGV contract and return value.

Conventions shared by all scripts:

* ``KEYS[1]`` is always the shard's ``meta`` key (it routes the call in Redis Cluster) and ``ARGV[1]`` the
  shard prefix ``prl:{<run_id>:<rank>}:``. Scripts build the other key names from the prefix (same suffixes
  as :mod:`pr_loader.store.keys`). Every such key carries the shard's hash tag, so it lives in the same
  cluster slot as ``KEYS[1]``: Redis Cluster accepts undeclared keys of the script's own slot.
* A mutating script takes an ``op_id``. It first looks for ``op:<op_id>``; if present the operation was
  already applied and the stored result is returned. Otherwise the script applies the change and stores its
  result under ``op:<op_id>`` in the same atomic step, so a retried call never applies twice. The op id is
  also appended to ``opids:<s>`` of the step it concerns, and the commit GC deletes the results of collected
  steps (a one-day TTL is only a backstop): op results are bounded by the retained window, like the rest.
* Scripts return a table whose first element is a status string: ``ok`` or an error code the Python side maps
  to an exception or action (``state``, ``lease_lost``, ``missing``, ``target``, ``needs``, ``range``,
  ``wait``, ``done``, ``restage``). Steps are returned as integers, timestamps as strings (Lua numbers
  would be truncated).
* Payloads live in string keys ``payload:<ref>`` (immutable once written). They never pass through Lua: a
  call uploads new payloads to ``stage:<op_id>:<i>`` keys first and its script adopts them by RENAME (or drops
  them), and readers MGET payload keys after the script returned the refs. Moving megabytes through Lua
  strings costs several times a plain MGET/SET; immutability makes the read after the script safe.
  On a plain server a claim, prefetch or step read saves that second round trip: its script leaves the refs in
  ``xfer:<op_id>`` and the caller sends ``SORT xfer:<op_id> BY nosort ... GET payload:*`` (the payloads in
  list order, read by the server itself) and ``DEL xfer:<op_id>`` right behind the script: in one
  MULTI/EXEC with the script on a plain socket (the script then also returns the payload sizes, so that
  the reply is received in one piece: :mod:`pr_loader.store.wire`), else pipelined (the SORT then also
  returns the refs, ``GET #``, and the script's reply carries none: a claim's script never reads its
  refs).
* Journal entries of step s (list ``journal:<s>``) are space-separated words ``<seq> <kind> ...`` where
  ``seq`` is a shard-wide counter (``meta.seq``): ``C <n_arrivals>`` (claim: original arrivals then
  fresh refs, in the list ``claimed:<s>``: a ``COPY`` of ``rows:<s>``, 0.2-0.3 ms less per 256-row claim than
  the refs in the entry, which the script had to read), ``F <source> <refs...>`` (prefetch),
  ``P <target> <old> <new> ...`` (postpone pairs), ``D <ref>`` (dead letter). Refs never contain spaces.
"""

from __future__ import annotations

# Shared helpers, prepended to every script that needs them.
_LIB = r"""
local P = ARGV[1]
local unpack = unpack or table.unpack
local K_META, K_STEPS, K_OWNERS = P .. 'meta', P .. 'steps', P .. 'owners'
local K_LEASES, K_REQUEUE = P .. 'leases', P .. 'requeue'
local K_MAT = P .. 'materialised'
local CHUNK = 1000

local function push_all(cmd, key, list)
  for i = 1, #list, CHUNK do
    redis.call(cmd, key, unpack(list, i, math.min(i + CHUNK - 1, #list)))
  end
end

local function push_front(key, list)  -- LPUSH keeping the list's order at the head
  local rev = {}
  for i = #list, 1, -1 do rev[#rev + 1] = list[i] end
  push_all('LPUSH', key, rev)
end

local function drop_payloads(refs)  -- delete payload keys, keeping meta.payloads (their count) exact
  local gone = 0
  for i = 1, #refs, CHUNK do
    local names = {}
    for n = i, math.min(i + CHUNK - 1, #refs) do names[#names + 1] = P .. 'payload:' .. refs[n] end
    gone = gone + redis.call('DEL', unpack(names))
  end
  if gone > 0 then redis.call('HINCRBY', K_META, 'payloads', -gone) end
end

local function drop_staged(op_id, n)
  for i = 1, n, CHUNK do
    local names = {}
    for k = i, math.min(i + CHUNK - 1, n) do names[#names + 1] = P .. 'stage:' .. op_id .. ':' .. (k - 1) end
    redis.call('DEL', unpack(names))
  end
end

local function all_staged(op_id, n)
  for i = 1, n, CHUNK do
    local names = {}
    for k = i, math.min(i + CHUNK - 1, n) do names[#names + 1] = P .. 'stage:' .. op_id .. ':' .. (k - 1) end
    if redis.call('EXISTS', unpack(names)) ~= #names then return false end
  end
  return true
end

-- What a reply carries for the refs it hands over: the table refs, or (refs nil) those of the list named
-- list. Flags '1' and '2' leave them in xfer:<op_id> for the caller's SORT xfer BY nosort ... GET payload:*
-- (it deletes the list in the same round trip: flag '2' in the same transaction; for flag '1' a TTL is the
-- backstop for a connection lost in between). A replay (replay = true) first drops what a lost earlier
-- attempt may have left there. Returns the refs (flag '0'), none (flag '1': the caller's SORT returns them
-- too, GET #, so a list is copied whole, never read here) or, for flag '2' (the caller reads the SORT reply
-- by its exact size: pr_loader.store.wire), two strings: the refs joined by spaces and the byte sizes of
-- their payloads joined by spaces (-1 for a missing payload).
local function hand_over(flag, op_id, refs, replay, list)
  if flag == '0' then return refs or redis.call('LRANGE', list, 0, -1) end
  local key = P .. 'xfer:' .. op_id
  if replay then redis.call('DEL', key) end
  if list then
    redis.call('COPY', list, key)
  elseif #refs > 0 then
    push_all('RPUSH', key, refs)
  end
  if flag == '1' then
    redis.call('PEXPIRE', key, 60000)
    return {}
  end
  refs = refs or redis.call('LRANGE', list, 0, -1)
  local sizes = {}
  for i = 1, #refs do
    local name = P .. 'payload:' .. refs[i]
    local n = redis.call('STRLEN', name)
    if n == 0 and redis.call('EXISTS', name) == 0 then n = -1 end
    sizes[i] = n
  end
  return table.concat(refs, ' '), table.concat(sizes, ' ')
end

-- staged payload k of op_id becomes the payload of refs[k + 1] (RENAME: no copy); ttl: '1' when the stages
-- carry a TTL (the uploader says so: see the staged scripts' last ARGV), which PERSIST then drops
local function adopt_staged(op_id, refs, ttl)
  for k = 1, #refs do
    local dest = P .. 'payload:' .. refs[k]
    redis.call('RENAME', P .. 'stage:' .. op_id .. ':' .. (k - 1), dest)
    if ttl == '1' then redis.call('PERSIST', dest) end
  end
  redis.call('HINCRBY', K_META, 'payloads', #refs)
end

local function split(str)
  local words = {}
  for w in string.gmatch(str, '%S+') do words[#words + 1] = w end
  return words
end

local function op_result(op_id)
  return redis.call('GET', P .. 'op:' .. op_id)
end

-- the result of op_id, an operation on step s: kept until s is garbage-collected (TTL one day as a backstop)
local function op_store(op_id, result, s)
  redis.call('SET', P .. 'op:' .. op_id, result, 'EX', 86400)
  redis.call('RPUSH', P .. 'opids:' .. s, op_id)
end

local function meta_num(field)
  return tonumber(redis.call('HGET', K_META, field))
end

local function total_steps()  -- E*S, or nil for an endless run
  local m = redis.call('HMGET', K_META, 'num_epochs', 'steps_per_epoch')
  if m[1] == '' then return nil end
  return tonumber(m[1]) * tonumber(m[2])
end

local function claimed(t)  -- claimed, committed, skipped or garbage-collected
  return t < meta_num('gc_floor') or redis.call('HEXISTS', K_STEPS, t) == 1
end

local function journal(s, kind, words)
  local seq = redis.call('HINCRBY', K_META, 'seq', 1)
  local body = seq .. ' ' .. kind
  if #words > 0 then body = body .. ' ' .. table.concat(words, ' ') end
  redis.call('RPUSH', P .. 'journal:' .. s, body)
end

-- nil if consumer holds a live lease on step s, else an error reply
local function check_lease(s, consumer, now)
  local state = redis.call('HGET', K_STEPS, s)
  if not state and redis.call('ZSCORE', K_REQUEUE, s) then
    return {'lease_lost', 'lease of step ' .. s .. ' expired; the step was returned for a new claim'}
  end
  local owner = redis.call('HGET', K_OWNERS, s)  -- kept after commit until the step is collected
  if state == 'committed' then
    if owner ~= consumer then return {'lease_lost', 'step ' .. s .. ' was committed by ' .. owner} end
    return {'state', 'step ' .. s .. ' is not in flight (already committed)'}
  end
  if state ~= 'inflight' then
    return {'state', 'step ' .. s .. ' is not in flight (' .. (state or 'unclaimed') .. ')'}
  end
  if owner ~= consumer then return {'lease_lost', 'step ' .. s .. ' is leased to ' .. tostring(owner)} end
  local expiry = redis.call('ZSCORE', K_LEASES, s)
  if tonumber(expiry) < tonumber(now) then
    return {'lease_lost', 'lease of step ' .. s .. ' expired at ' .. expiry}
  end
  return nil
end

-- Undo one journal entry (words w) of step s. ctx.ex: refs that must not come back (dead letters, rows kept
-- by a claimed step); ctx.extras[s]: segments of prefetched refs that could not go back to their source.
local function undo_entry(s, w, ctx)
  local kind = w[2]
  if kind == 'D' then
    ctx.ex[w[3]] = true
  elseif kind == 'P' then
    -- a claimed target has no arrivals list any more (and takes no new arrivals), so LREM finds nothing
    local arrivals = P .. 'arrivals:' .. w[3]
    for i = #w - 1, 4, -2 do
      local old, new = w[i], w[i + 1]
      if redis.call('LREM', arrivals, 1, new) == 1 then
        drop_payloads({new})
      else
        ctx.ex[old] = true  -- the new version lives on elsewhere (or is dead): the old one must not return
      end
    end
  elseif kind == 'F' then
    local t = tonumber(w[3])
    local keep = {}
    for i = 4, #w do
      if not ctx.ex[w[i]] then keep[#keep + 1] = w[i] end
    end
    if #keep > 0 then
      if claimed(t) then
        ctx.extras[s] = ctx.extras[s] or {}
        table.insert(ctx.extras[s], 1, keep)
      else
        push_front(P .. 'batch:' .. t, keep)
      end
    end
  elseif kind == 'C' then
    local na = tonumber(w[3])
    local ck = P .. 'claimed:' .. s
    local arr, bat = {}, {}
    for i, r in ipairs(redis.call('LRANGE', ck, 0, -1)) do
      if not ctx.ex[r] then
        if i <= na then arr[#arr + 1] = r else bat[#bat + 1] = r end
      end
    end
    for _, seg in ipairs(ctx.extras[s] or {}) do
      for _, r in ipairs(seg) do bat[#bat + 1] = r end
    end
    redis.call('DEL', P .. 'arrivals:' .. s, P .. 'batch:' .. s, P .. 'rows:' .. s, ck)
    push_all('RPUSH', P .. 'arrivals:' .. s, arr)
    push_all('RPUSH', P .. 'batch:' .. s, bat)
    redis.call('HDEL', K_STEPS, s)
    redis.call('HDEL', K_OWNERS, s)
    redis.call('ZREM', K_LEASES, s)
  end
end

-- Return the rows of in-flight step s to where they came from, as far as is safe (its journal undone, newest
-- entry first), and queue the step for a new claim.
local function expire_step(s)
  local ctx = {ex = {}, extras = {}}
  local entries = redis.call('LRANGE', P .. 'journal:' .. s, 0, -1)
  for i = #entries, 1, -1 do undo_entry(s, split(entries[i]), ctx) end
  redis.call('DEL', P .. 'journal:' .. s)
  redis.call('ZADD', K_REQUEUE, s, s)
end

-- Expire every in-flight step whose lease ran out before now. Returns those steps.
local function expire_due(now)
  local due = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', '(' .. now)
  for _, sv in ipairs(due) do expire_step(tonumber(sv)) end
  return due
end

-- Whether step h (-1: none) is claimed ahead by consumer and untouched since: in flight, its lease held by
-- consumer, nothing moved into or out of it (its journal holds the claim alone). Such a step is given back
-- (expire_step: requeued, so it is claimed first again) by a move of another step (not s) that goes through,
-- so that the move sees the store as if h had not been claimed (pr_loader.store.batch_store: ``held``).
local function can_give_back(h, consumer, s)
  if h < 0 or h == s then return false end
  if redis.call('HGET', K_STEPS, h) ~= 'inflight' or redis.call('HGET', K_OWNERS, h) ~= consumer then
    return false
  end
  return redis.call('LLEN', P .. 'journal:' .. h) == 1
end
"""

# OPEN: create the run's meta hash or return the stored one.
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] "1" to create if missing, ARGV[3..] field, value pairs.
# Returns {'created'} | {'missing'} | {'exists', <HGETALL meta>}.
OPEN = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists', redis.call('HGETALL', KEYS[1])}
end
if ARGV[2] ~= '1' then return {'missing'} end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'next_step', 0, 'committed_upto', -1, 'gc_floor', 0, 'seq', 0, 'payloads', 0)
return {'created'}
"""

# MATERIALISE: store the fresh batch of a step once; payload i was staged at stage:<op_id>:<i>.
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] op_id, ARGV[3] step, ARGV[4..n-1] refs "<e>:<i>:0:-",
# ARGV[n] '1' when the stages carry a TTL, else '0' (set by the uploader: pr_loader.store.wire).
# Returns {'ok', 1} when written, {'ok', 0} when the step was already materialised, claimed or collected
# (the staged payloads are dropped), {'restage'} when a staged payload is missing (the others are dropped,
# nothing else changed).
MATERIALISE = _LIB + r"""
local op_id, s = ARGV[2], tonumber(ARGV[3])
if op_result(op_id) then return {'ok', 1} end  -- a retry of the call that wrote it
local refs = {}
for i = 4, #ARGV - 1 do refs[#refs + 1] = ARGV[i] end
if redis.call('HEXISTS', K_MAT, s) == 1 or claimed(s) then
  drop_staged(op_id, #refs)
  return {'ok', 0}
end
if not all_staged(op_id, #refs) then
  drop_staged(op_id, #refs)
  return {'restage'}
end
adopt_staged(op_id, refs, ARGV[#ARGV])
redis.call('DEL', P .. 'batch:' .. s)
push_all('RPUSH', P .. 'batch:' .. s, refs)
redis.call('HSET', K_MAT, s, #refs)
op_store(op_id, '1', s)
return {'ok', 1}
"""

# CLAIM: expire due leases, then lease the lowest requeued step, else the step at the cursor (drain steps
# s >= E*S are claimed only while some arrivals:<u>, u >= s, exist; empty ones are marked 'skipped').
# Moves arrivals:<s> then batch:<s> into rows:<s> and journals them (a copy in claimed:<s>).
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] op_id, ARGV[3] consumer, ARGV[4] now, ARGV[5] lease expiry,
# ARGV[6] held: a step this consumer claimed ahead (-1: none), given back first if untouched (can_give_back),
# ARGV[7] the hand-over flag: '1' to leave the returned refs in xfer:<op_id>, '2' to also return them joined
# and with their payload sizes (see hand_over), else '0'.
# Payloads are immutable, so the caller reads them (payload:<ref>) after the script: moving the bytes
# through Lua costs several times a plain MGET.
# Returns {'ok', step, expiry, expired_steps, refs (flag '1': none; flag '2': joined, then sizes)} |
# {'needs', step, expired} |
# {'wait', earliest_expiry, expired} | {'done', expired} | {'lease_lost', msg} (replay of a lost claim).
CLAIM = _LIB + r"""
local consumer = ARGV[3]
local done_op = op_result(ARGV[2])
if done_op then
  local s = tonumber(done_op)
  if redis.call('HGET', K_STEPS, s) ~= 'inflight' or redis.call('HGET', K_OWNERS, s) ~= consumer then
    return {'lease_lost', 'claim of step ' .. s .. ' by ' .. consumer .. ' is no longer held'}
  end
  local expiry = redis.call('ZSCORE', K_LEASES, s)
  return {'ok', s, expiry, {}, hand_over(ARGV[7], ARGV[2], nil, true, P .. 'rows:' .. s)}
end
local held = tonumber(ARGV[6])
if can_give_back(held, consumer, -1) then expire_step(held) end
local expired = expire_due(ARGV[4])
local s
local rq = redis.call('ZRANGE', K_REQUEUE, 0, 0)
if #rq > 0 then
  s = tonumber(rq[1])
  redis.call('ZREM', K_REQUEUE, s)
else
  local cur = meta_num('next_step')
  local total = total_steps()
  if total and cur >= total then
    local last = meta_num('max_target') or -1
    while cur <= last and redis.call('LLEN', P .. 'arrivals:' .. cur) == 0 do
      redis.call('HSET', K_STEPS, cur, 'skipped')
      cur = cur + 1
    end
    redis.call('HSET', K_META, 'next_step', cur)
    if cur > last then
      local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
      if #first > 0 then return {'wait', first[2], expired} end
      return {'done', expired}
    end
  elseif redis.call('HEXISTS', K_MAT, cur) == 0 then
    return {'needs', cur, expired}
  end
  s = cur
  redis.call('HSET', K_META, 'next_step', s + 1)
end
-- rows:<s> = arrivals then the fresh batch; the batch list is renamed, not copied (~0.1 ms less, 256 rows)
local rk, bk, ak = P .. 'rows:' .. s, P .. 'batch:' .. s, P .. 'arrivals:' .. s
local arrivals = redis.call('LRANGE', ak, 0, -1)
local na = #arrivals
if redis.call('EXISTS', bk) == 1 then
  redis.call('RENAME', bk, rk)
  push_front(rk, arrivals)
else
  redis.call('DEL', rk)
  push_all('RPUSH', rk, arrivals)
end
redis.call('DEL', ak)
local ck = P .. 'claimed:' .. s  -- (none left by an earlier claim of s: its undo or GC deleted it)
redis.call('COPY', rk, ck, 'REPLACE')
journal(s, 'C', {na})
redis.call('HSET', K_STEPS, s, 'inflight')
redis.call('HSET', K_OWNERS, s, consumer)
redis.call('ZADD', K_LEASES, ARGV[5], s)
op_store(ARGV[2], s, s)
return {'ok', s, ARGV[5], expired, hand_over(ARGV[7], ARGV[2], nil, false, rk)}
"""

# RENEW: extend the lease of a step held by consumer.
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] step, ARGV[3] consumer, ARGV[4] now, ARGV[5] new expiry.
# Returns {'ok'} | {'state', msg} | {'lease_lost', msg}.
RENEW = _LIB + r"""
local s = tonumber(ARGV[2])
local err = check_lease(s, ARGV[3], ARGV[4])
if err then return err end
redis.call('ZADD', K_LEASES, ARGV[5], s)
return {'ok'}
"""

# COMMIT: mark a leased step committed, raise committed_upto, then garbage-collect committed steps
# g <= committed_upto - retain_steps - 1 (journal, rows, their payloads, superseded postponed versions).
# The commit's own op result is filed under step + retain_steps + 1 (or the new gc_floor if higher), so a
# retried commit still finds it after its step was collected, for another retain_steps + 1 steps.
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] op_id, ARGV[3] step, ARGV[4] consumer, ARGV[5] now.
# Returns {'ok'} | {'state', msg} | {'lease_lost', msg}.
COMMIT = _LIB + r"""
if op_result(ARGV[2]) then return {'ok'} end
local s = tonumber(ARGV[3])
if not redis.call('HGET', K_STEPS, s) and s < meta_num('gc_floor') then
  return {'state', 'step ' .. s .. ' is already committed'}
end
local err = check_lease(s, ARGV[4], ARGV[5])
if err then return err end
redis.call('HSET', K_STEPS, s, 'committed')
redis.call('ZREM', K_LEASES, s)
local upto = meta_num('committed_upto')
if s > upto then
  upto = s
  redis.call('HSET', K_META, 'committed_upto', upto)
end
local floor = meta_num('gc_floor')
local limit = upto - meta_num('retain_steps') - 1
while floor <= limit do
  local st = redis.call('HGET', K_STEPS, floor)
  if st ~= 'committed' and st ~= 'skipped' then break end
  local dead = redis.call('LRANGE', P .. 'rows:' .. floor, 0, -1)
  for _, e in ipairs(redis.call('LRANGE', P .. 'journal:' .. floor, 0, -1)) do
    if string.find(e, '^%d+ P ') then  -- (only these are split)
      local w = split(e)
      for i = 4, #w, 2 do dead[#dead + 1] = w[i] end
    end
  end
  drop_payloads(dead)
  local ops = redis.call('LRANGE', P .. 'opids:' .. floor, 0, -1)
  for i = 1, #ops, CHUNK do
    local names = {}
    for n = i, math.min(i + CHUNK - 1, #ops) do names[#names + 1] = P .. 'op:' .. ops[n] end
    redis.call('DEL', unpack(names))
  end
  redis.call('DEL', P .. 'rows:' .. floor, P .. 'journal:' .. floor, P .. 'opids:' .. floor,
             P .. 'claimed:' .. floor)
  redis.call('HDEL', K_STEPS, floor)
  redis.call('HDEL', K_OWNERS, floor)
  redis.call('HDEL', K_MAT, floor)
  floor = floor + 1
end
redis.call('HSET', K_META, 'gc_floor', floor)
op_store(ARGV[2], 'ok', math.max(s + meta_num('retain_steps') + 1, floor))
return {'ok'}
"""

# POSTPONE: move rows of a leased step into arrivals:<target> as new versions with new payloads.
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] op_id, ARGV[3] step, ARGV[4] consumer, ARGV[5] now,
# ARGV[6] target, ARGV[7] held (see CLAIM: given back when the postpone goes through), ARGV[8..n-1] old ref,
# new ref pairs (the new payload of pair i was staged at stage:<op_id>:<i>), ARGV[n] '1' when the stages
# carry a TTL, else '0' (see MATERIALISE). Staged payloads are adopted on success and dropped on refusal or
# replay.
# Returns {'ok'} | {'state', msg} | {'lease_lost', msg} | {'target', msg} | {'missing', refs} |
# {'restage'} (a staged payload is missing; the others are dropped, nothing else changed).
POSTPONE = _LIB + r"""
local op_id, s, t = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[6])
local last = #ARGV - 1
local n = (last - 7) / 2
local function refuse(reply)
  drop_staged(op_id, n)
  return reply
end
if op_result(op_id) then return refuse({'ok'}) end
local err = check_lease(s, ARGV[4], ARGV[5])
if err then return refuse(err) end
local held = tonumber(ARGV[7])
local give = can_give_back(held, ARGV[4], s)
-- every claimed step is below the cursor and not requeued, so this also refuses claimed targets
local passed = t < meta_num('next_step') and not redis.call('ZSCORE', K_REQUEUE, t)
if t <= s or (passed and not (give and t == held)) then
  return refuse({'target', 'target step ' .. t .. ' was already claimed or passed'})
end
if not all_staged(op_id, n) then return refuse({'restage'}) end
-- remove the old refs, keeping a copy of rows:<s> to put back should one be missing (one COPY instead of
-- an LPOS per ref: a script's fixed cost is its redis.call count)
local rk, kept = P .. 'rows:' .. s, P .. 'rows:' .. s .. ':kept'
local copied = redis.call('COPY', rk, kept, 'REPLACE') == 1  -- (no rows:<s>, no copy: nothing to remove)
local missing = {}
for i = 8, last, 2 do
  if redis.call('LREM', rk, 1, ARGV[i]) == 0 then missing[#missing + 1] = ARGV[i] end
end
if #missing > 0 then
  if copied then redis.call('RENAME', kept, rk) end
  return refuse({'missing', missing})
end
if copied then redis.call('DEL', kept) end
if give then expire_step(held) end
local news, words = {}, {t}
for i = 8, last, 2 do
  news[#news + 1] = ARGV[i + 1]
  words[#words + 1] = ARGV[i]
  words[#words + 1] = ARGV[i + 1]
end
adopt_staged(op_id, news, ARGV[#ARGV])
push_all('RPUSH', P .. 'arrivals:' .. t, news)
journal(s, 'P', words)
if t > (meta_num('max_target') or -1) then redis.call('HSET', K_META, 'max_target', t) end
op_store(ARGV[2], 'ok', s)
return {'ok'}
"""

# PREFETCH: pop up to count fresh refs from batch:<t>, t = step+1 .. last_source (nearest first, skipping
# claimed and drain steps), append them to rows:<step>; stop at the first unmaterialised t.
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] op_id, ARGV[3] step, ARGV[4] consumer, ARGV[5] now, ARGV[6] count,
# ARGV[7] last_source, ARGV[8] held (see CLAIM: given back first), ARGV[9] the hand-over flag ('0', '1' or
# '2': see CLAIM's ARGV[7] and hand_over).
# Returns {'ok', needs_materialise (-1 if none), refs (flag '1': none; '2': joined, then sizes)} |
# {'state', msg} | {'lease_lost', msg}.
PREFETCH = _LIB + r"""
local done_op = op_result(ARGV[2])
if done_op then
  local w = split(done_op)
  local refs = {}
  for i = 2, #w do refs[#refs + 1] = w[i] end
  return {'ok', tonumber(w[1]), hand_over(ARGV[9], ARGV[2], refs, true)}
end
local s, want = tonumber(ARGV[3]), tonumber(ARGV[6])
local err = check_lease(s, ARGV[4], ARGV[5])
if err then return err end
local held = tonumber(ARGV[8])
if can_give_back(held, ARGV[4], s) then expire_step(held) end
local total = total_steps()
local got, needs = {}, -1
for t = s + 1, tonumber(ARGV[7]) do
  if #got >= want then break end
  -- (t > s >= gc_floor, s being in flight: claimed(t) is its HEXISTS alone)
  if redis.call('HEXISTS', K_STEPS, t) == 0 and not (total and t >= total) then
    if redis.call('HEXISTS', K_MAT, t) == 0 then
      needs = t
      break
    end
    local popped = redis.call('LPOP', P .. 'batch:' .. t, want - #got)
    if popped then
      local words = {t}
      for _, r in ipairs(popped) do
        got[#got + 1] = r
        words[#words + 1] = r
      end
      journal(s, 'F', words)
    end
  end
end
push_all('RPUSH', P .. 'rows:' .. s, got)
local stored = {needs}
for _, r in ipairs(got) do stored[#stored + 1] = r end
op_store(ARGV[2], table.concat(stored, ' '), s)
return {'ok', needs, hand_over(ARGV[9], ARGV[2], got)}
"""

# DEAD_LETTER: remove a ref from an in-flight step, append a dead-letter record (the caller put the payload
# in it) and delete the ref's payload key.
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] op_id, ARGV[3] step, ARGV[4] ref, ARGV[5] record.
# Returns {'ok'} | {'state', msg} | {'missing', {ref}}.
DEAD_LETTER = _LIB + r"""
if op_result(ARGV[2]) then return {'ok'} end
local s, ref = tonumber(ARGV[3]), ARGV[4]
if redis.call('HGET', K_STEPS, s) ~= 'inflight' then return {'state', 'step ' .. s .. ' is not in flight'} end
if redis.call('LREM', P .. 'rows:' .. s, 1, ref) == 0 then return {'missing', {ref}} end
redis.call('RPUSH', P .. 'dead', ARGV[5])
drop_payloads({ref})
journal(s, 'D', {ref})
op_store(ARGV[2], 'ok', s)
return {'ok'}
"""

# EXPIRE: expire every lease that ran out before now (see expire_due).
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] now. Returns {'ok', expired_steps}.
EXPIRE = _LIB + r"""
return {'ok', expire_due(ARGV[2])}
"""

# ROLLBACK: undo every journal entry of the steps after to_step, newest first (shard-wide seq order), so the
# shard is exactly as right after committed step to_step; cursor = to_step + 1, committed_upto = to_step.
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] op_id, ARGV[3] to_step.
# Returns {'ok', undone_entries} | {'range', lowest allowed, highest allowed}.
ROLLBACK = _LIB + r"""
if op_result(ARGV[2]) then return {'ok', 0} end
local k = tonumber(ARGV[3])
local low, high = meta_num('gc_floor') - 1, meta_num('committed_upto')
if k < low or k > high then return {'range', low, high} end
local top = meta_num('next_step') - 1
local all = {}
for s = k + 1, top do
  for _, e in ipairs(redis.call('LRANGE', P .. 'journal:' .. s, 0, -1)) do
    local w = split(e)
    all[#all + 1] = {tonumber(w[1]), s, w}
  end
end
table.sort(all, function(a, b) return a[1] > b[1] end)
local ctx = {ex = {}, extras = {}}
for _, e in ipairs(all) do undo_entry(e[2], e[3], ctx) end
for s = k + 1, top do
  redis.call('DEL', P .. 'journal:' .. s)
  redis.call('HDEL', K_STEPS, s)
  redis.call('HDEL', K_OWNERS, s)
  redis.call('ZREM', K_LEASES, s)
end
redis.call('ZREMRANGEBYSCORE', K_REQUEUE, '(' .. k, '+inf')
redis.call('HSET', K_META, 'next_step', k + 1, 'committed_upto', k)
op_store(ARGV[2], 'ok', k + 1)
return {'ok', #all}
"""

# READ_ROWS: the current refs of a step: rows:<s> once claimed, else arrivals then batch. Changes nothing
# but the hand-over list, which the caller deletes in the same round trip (see hand_over).
# KEYS[1] meta; ARGV[1] prefix, ARGV[2] op_id (names the hand-over list), ARGV[3] step, ARGV[4] the hand-over
# flag (see CLAIM's ARGV[7]). Returns {'ok', refs (flag '1': none; '2': joined, then sizes)}.
READ_ROWS = _LIB + r"""
local s = ARGV[3]
local refs
if redis.call('HEXISTS', K_STEPS, s) == 1 then
  refs = redis.call('LRANGE', P .. 'rows:' .. s, 0, -1)
else
  refs = redis.call('LRANGE', P .. 'arrivals:' .. s, 0, -1)
  for _, r in ipairs(redis.call('LRANGE', P .. 'batch:' .. s, 0, -1)) do refs[#refs + 1] = r end
end
return {'ok', hand_over(ARGV[4], ARGV[2], refs)}
"""
