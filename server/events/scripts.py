"""The Lua scripts of RedisEventLog: each is one atomic step on one run's keys.

Every script touches only the keys of one run, or of one thread and the runs
made on it (one hash slot either way, see keys.py). A script that must reach
another run of the thread (its queue holds run ids) builds that run's key
from the thread's key base: base .. (run id after "<thread_id>:") .. ':run'.
Hash field names are those of keys.RunField and states the values of
log.RunState: 'queued' and 'running' are the runnable states (RunState.runnable),
the only ones that hold a lease. Results are arrays whose first element is a
status code, decoded by redis.py.

A script that sets a lease returns when it lapses (unix ms, Redis's clock:
the lease's own PX deadline), and one that may leave a run claimable returns
Redis's now: redis.py records either in the lease deadline set (keys.py)
after the script, since that set is in another slot. DUE and RESCHEDULE are
the only scripts on that set, and touch nothing else.
"""

from __future__ import annotations

# Status codes returned as the first element of a script's reply.
OK = 0
NOT_FOUND = 1
STALE_EPOCH = 2
INDEX_CONFLICT = 3
OFFSET_EXPIRED = 4
NOT_RUNNABLE = 5  # the run is suspended or ended: nobody may own it
LEASE_HELD = 6  # the run's owner still holds its lease
CONFLICT = 7  # the run is no longer in the state (or at the epoch) the caller read
NOT_RESUMABLE = 8  # the run is live only: its events below the head are not kept
BUSY = 9  # the thread has an active (or queued) run
EXISTS = 10  # the run to create exists already

# Redis's clock in unix ms (TIME: seconds, microseconds), which PX deadlines follow.
_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Store a new run unless its hash exists, and give its creator the lease.
# KEYS[1]   the run hash
# KEYS[2]   the lease
# ARGV[1]   lease TTL in ms, 0 = no lease (the new run is not runnable)
# ARGV[2]   the creator's epoch (the lease's value)
# ARGV[3..] field, value, field, value, ... of the new record
# Returns {1, when the lease lapses (0 = no lease)} when created,
#         {0, {field, value, ...}, now} with the stored record otherwise.
CREATE_RUN = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGETALL', KEYS[1]), now_ms()}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if tonumber(ARGV[1]) > 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
  return {1, now_ms() + tonumber(ARGV[1])}
end
return {1, 0}
"""
)

# Append a batch of events, store the checkpoint, move the run's state,
# trim, update the run's thread, and publish: the whole of EventLog.append in
# one atomic step, so readers and listeners only ever see committed events, a
# checkpoint is never ahead of (or behind) the events it covers, and a thread
# never holds half a run.
# KEYS[1]   the run hash
# KEYS[2]   the events ZSET
# KEYS[3]   the lease (deleted when the new state is not runnable)
# KEYS[4..9] the run's other keys (tools, counters, once, resumes, tasks,
#           task_log: keys.run_keys): with the first two, they get the
#           terminal TTL, and so do the hashes of the run's tasks
# KEYS[10..14] with a terminal state of a run on a thread: the thread's hash,
#           messages, queue, runs and pending entries (keys.thread_keys)
# ARGV[1]   the writer's epoch
# ARGV[2]   new state, or '' to keep the state
# ARGV[3]   error recorded with the new state
# ARGV[4]   now, unix ms (update_time_ms)
# ARGV[5]   the log's TTL in ms when the new state is terminal (the run's own
#           ttl_ms field wins when set), else 0
# ARGV[6]   events to retain per run, 0 = all
# ARGV[7]   the live channel
# ARGV[8]   serialized EventBatch of the events, published after the commit ('' = none)
# ARGV[9]   index of the first event (Lua cannot parse protobuf); unused without events
# ARGV[10]  '1' to store ARGV[11] as the checkpoint, '0' to keep the stored one
# ARGV[11]  the checkpoint (binary)
# ARGV[12]  the number of events, n
# ARGV[13]  the thread's key base (keys.thread_base), or ''
# ARGV[14]  the thread id, or ''
# ARGV[15]  the run id
# ARGV[16]  the thread's idle TTL in ms, 0 = none
# ARGV[17]  the step of the last event ('' without events): a live-only run keeps
#           it (and ARGV[18]) in place of the events it does not keep
# ARGV[18]  the attempt of the last event
# ARGV[19]  the run's key base (keys.run_base): its tasks' keys are base .. 'task:' ..
#           the task id's last 16 characters
# ARGV[20]  the run's goal progress to store, or '' to keep the stored one
# ARGV[21..20+n] the serialized events, in index order
# ARGV[21+n..] entries to add to the thread's history (terminal state only)
# Returns {OK, next_index, promoted run id or ''[, now, 1 if the lease exists else 0]}
#       | {NOT_FOUND} | {STALE_EPOCH, run epoch} | {INDEX_CONFLICT, next_index}
#       (now and the lease's existence only with a new state, ARGV[2] ~= '')
# The script's text names the incarnation of the store it is meant for (the
# redis-server's run_id, incarnation.py: append_script) and stamps the run's
# lineage with it when events land in a new incarnation.
_INCARNATION = "@@INCARNATION@@"
APPEND = (
    _NOW
    + f"local incarnation = '{_INCARNATION}'"
    + """
local run, events, lease = KEYS[1], KEYS[2], KEYS[3]
local function done(next_index, promoted)
  if ARGV[2] == '' then return {0, next_index, promoted} end
  return {0, next_index, promoted, now_ms(), redis.call('EXISTS', lease)}
end
local first_event = 21  -- ARGV position of the first serialized event
local n = tonumber(ARGV[12])
local first_message = first_event + n
local f = redis.call('HMGET', run, 'epoch', 'next_index', 'earliest_index', 'live_only',
  'ttl_ms', 'rollback', 'incarnation')
if not f[1] then return {1} end
if tonumber(f[1]) ~= tonumber(ARGV[1]) then return {2, tonumber(f[1])} end
local next_index, earliest = tonumber(f[2]), tonumber(f[3]) or 0
local keep = f[4] ~= '1'
local first = tonumber(ARGV[9])
if n > 0 and first ~= next_index then
  -- An exact replay of a committed batch (a retry after a lost reply) is a no-op.
  if keep and first >= earliest and first + n <= next_index then
    local stored = redis.call('ZRANGEBYSCORE', events, first, first + n - 1)
    local same = #stored == n
    for i = 1, n do
      if not same then break end
      same = stored[i] == ARGV[first_event + i - 1]
    end
    if same then return done(next_index, '') end
  end
  return {3, next_index}
end
-- ZADD in chunks: unpack() is limited by Lua's C stack.
local i = 1
while keep and i <= n do
  local last = math.min(i + 999, n)
  local args = {}
  for j = i, last do
    args[#args + 1] = first + j - 1
    args[#args + 1] = ARGV[first_event + j - 1]
  end
  redis.call('ZADD', events, unpack(args))
  i = last + 1
end
next_index = next_index + n
local update = {'next_index', next_index, 'update_time_ms', ARGV[4]}
if n > 0 and f[7] ~= incarnation then
  -- The first events this incarnation writes: where its stretch of the log starts.
  local lineage = redis.call('HGET', run, 'lineage')
  local stretch = incarnation .. '@' .. first
  if lineage then stretch = lineage .. ',' .. stretch end
  table.insert(update, 'incarnation'); table.insert(update, incarnation)
  table.insert(update, 'lineage'); table.insert(update, stretch)
end
if ARGV[2] ~= '' then
  table.insert(update, 'state'); table.insert(update, ARGV[2])
  table.insert(update, 'error'); table.insert(update, ARGV[3])
  -- Nobody executes a suspended or ended run: a Resume makes it claimable at once.
  if ARGV[2] ~= 'queued' and ARGV[2] ~= 'running' then redis.call('DEL', lease) end
end
if ARGV[10] == '1' then
  table.insert(update, 'checkpoint'); table.insert(update, ARGV[11])
end
if ARGV[20] ~= '' then
  table.insert(update, 'goal_progress'); table.insert(update, ARGV[20])
end
local retain = tonumber(ARGV[6])
if not keep and n > 0 then
  table.insert(update, 'last_step'); table.insert(update, ARGV[17])
  table.insert(update, 'last_attempt'); table.insert(update, ARGV[18])
end
if keep and retain > 0 and next_index - retain > earliest then
  earliest = next_index - retain
  redis.call('ZREMRANGEBYSCORE', events, '-inf', '(' .. earliest)
  table.insert(update, 'earliest_index'); table.insert(update, earliest)
end
redis.call('HSET', run, unpack(update))
local ttl_ms = tonumber(ARGV[5])
local promoted = ''
if ttl_ms > 0 then
  if tonumber(f[5] or '0') > 0 then ttl_ms = tonumber(f[5]) end
  -- The lease is gone already (a terminal state is not runnable): PEXPIRE skips it.
  for k = 1, 9 do redis.call('PEXPIRE', KEYS[k], ttl_ms) end
  for _, task_id in ipairs(redis.call('SMEMBERS', KEYS[8])) do
    redis.call('PEXPIRE', ARGV[19] .. 'task:' .. string.sub(task_id, -16), ttl_ms)
  end
  if #KEYS >= 14 and redis.call('EXISTS', KEYS[10]) == 1 then
    local thread, messages, queue, pending = KEYS[10], KEYS[11], KEYS[12], KEYS[14]
    local base, thread_id, run_id = ARGV[13], ARGV[14], ARGV[15]
    if redis.call('HGET', thread, 'active_run_id') == run_id then
      local m = #ARGV - first_message + 1
      local j = 0
      while f[6] ~= '1' and j < m do
        local last = math.min(j + 1000, m)
        redis.call('RPUSH', messages, unpack(ARGV, first_message + j, first_message + last - 1))
        j = last
      end
      -- What came while the run had the thread (late task results) follows its messages.
      local late = redis.call('LRANGE', pending, 0, -1)
      if #late > 0 then
        redis.call('RPUSH', messages, unpack(late))
        redis.call('DEL', pending)
      end
      -- The thread goes to the first queued run that still waits for it.
      while true do
        local queued = redis.call('LPOP', queue)
        if not queued then break end
        local queued_run = base .. string.sub(queued, #thread_id + 2) .. ':run'
        if redis.call('HGET', queued_run, 'state') == 'enqueued' then
          redis.call('HSET', queued_run, 'state', 'queued', 'update_time_ms', ARGV[4])
          promoted = queued
          break
        end
      end
      redis.call('HSET', thread, 'active_run_id', promoted, 'update_time_ms', ARGV[4])
      local idle_ms = tonumber(ARGV[16])
      if promoted == '' and idle_ms > 0 then
        for k = 10, 14 do redis.call('PEXPIRE', KEYS[k], idle_ms) end
      end
    else
      redis.call('LREM', queue, 0, run_id)
    end
  end
end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
return done(next_index, promoted)
"""
)

# Read a page of events, checking the run exists and the offset is retained.
# KEYS[1]  the run hash
# KEYS[2]  the events ZSET
# ARGV[1]  offset (inclusive)
# ARGV[2]  the most events to return
# Returns {OK, {member, ...}} | {NOT_FOUND} | {OFFSET_EXPIRED, earliest_index, next_index}
#       | {NOT_RESUMABLE, next_index}
READ = """
local f = redis.call('HMGET', KEYS[1], 'next_index', 'earliest_index', 'live_only')
if not f[1] then return {1} end
local offset = tonumber(ARGV[1])
local earliest = tonumber(f[2]) or 0
if f[3] == '1' and offset < tonumber(f[1]) then return {8, tonumber(f[1])} end
if offset < earliest then return {4, earliest, tonumber(f[1])} end
if offset >= tonumber(f[1]) then return {0, {}} end
return {0, redis.call('ZRANGEBYSCORE', KEYS[2], offset, '+inf', 'LIMIT', 0, ARGV[2])}
"""

# Increment a counter of an existing run, at most once per once key; a
# terminal run's TTL carries over to the hashes it writes.
# KEYS[1]  the counters hash
# KEYS[2]  the run hash
# KEYS[3]  the once-keys hash
# ARGV[1]  the counter's name
# ARGV[2]  the once key, '' to always increment
# Returns {OK, the counter's value} | {NOT_FOUND}
INCR_COUNTER = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {1} end
local value
if ARGV[2] ~= '' and redis.call('HSETNX', KEYS[3], ARGV[2], 1) == 0 then
  value = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
else
  value = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
local ttl_ms = redis.call('PTTL', KEYS[2])
if ttl_ms > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('PEXPIRE', KEYS[3], ttl_ms)
end
return {0, value}
"""

# Take a runnable run over once its lease lapsed: bump the epoch (fencing
# the previous owner), record the new owner and give it the lease.
# KEYS[1]  the run hash
# KEYS[2]  the lease
# ARGV[1]  the new owner
# ARGV[2]  lease TTL in ms
# ARGV[3]  '1': take it even while its lease is held (force)
# Returns {OK, {field, value, ...}, when the lease lapses} | {NOT_FOUND} | {NOT_RUNNABLE}
#       | {LEASE_HELD}
CLAIM = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {1} end
if state ~= 'queued' and state ~= 'running' then return {5} end
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then return {6} end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('SET', KEYS[2], epoch, 'PX', ARGV[2])
return {0, redis.call('HGETALL', KEYS[1]), now_ms() + tonumber(ARGV[2])}
"""
)

# Extend the lease of the owner at an epoch, or take it again if it lapsed
# and nobody claimed the run meanwhile (a claim would have bumped the epoch).
# KEYS[1]  the run hash
# KEYS[2]  the lease
# ARGV[1]  the owner's epoch
# ARGV[2]  lease TTL in ms
# Returns {OK, when the lease lapses} | {NOT_FOUND} | {NOT_RUNNABLE} | {STALE_EPOCH, run epoch}
RENEW = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'epoch')
if not f[1] then return {1} end
if f[1] ~= 'queued' and f[1] ~= 'running' then return {5} end
if tonumber(f[2]) ~= tonumber(ARGV[1]) then return {2, tonumber(f[2])} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {0, now_ms() + tonumber(ARGV[2])}
"""
)

# Drop the lease if it is held at the given epoch.
# KEYS[1]  the lease
# ARGV[1]  the owner's epoch
# Returns {OK, 1 if dropped else 0, now}
RELEASE = (
    _NOW
    + """
local held = redis.call('GET', KEYS[1])
if held and tonumber(held) == tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return {0, 1, now_ms()}
end
return {0, 0, 0}
"""
)

# The lease deadline set (keys.lease_deadlines): its members whose deadline has come,
# in deadline order, with Redis's now (the one key this touches: any slot).
# KEYS[1]  the deadline ZSET
# ARGV[1]  offset into the due members
# ARGV[2]  the most members to return
# ARGV[3]  now as returned by an earlier page of the same walk, or '' to read the clock
# Returns {now, {member, deadline, member, deadline, ...}}
DUE = (
    _NOW
    + """
local now = tonumber(ARGV[3]) or now_ms()
return {now, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES',
  'LIMIT', ARGV[1], ARGV[2])}
"""
)

# Move members of the deadline set to new deadlines, each only if its deadline is
# still the one the caller read (a writer that moved it meanwhile knew better).
# KEYS[1]  the deadline ZSET
# ARGV     member, deadline read, new deadline, member, ... (triples)
# Returns the number of members moved.
RESCHEDULE = """
local moved = 0
for i = 1, #ARGV, 3 do
  local deadline = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if deadline and tonumber(deadline) == tonumber(ARGV[i + 1]) then
    redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""

# Record a tool call's result for the owner at an epoch; the first write wins.
# KEYS[1]  the run hash
# KEYS[2]  the tools hash
# ARGV[1]  the writer's epoch
# ARGV[2]  the tool call id
# ARGV[3]  the result (binary)
# Returns {OK, 1 if recorded now else 0} | {NOT_FOUND} | {STALE_EPOCH, run epoch}
JOURNAL_TOOL = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return {1} end
if tonumber(epoch) ~= tonumber(ARGV[1]) then return {2, tonumber(epoch)} end
local recorded = redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
local ttl_ms = redis.call('PTTL', KEYS[1])
if ttl_ms > 0 then redis.call('PEXPIRE', KEYS[2], ttl_ms) end
return {0, recorded}
"""

# Store a cancel request with a run that has not ended (the first reason
# wins) and tell its owner, with the stored reason, after the commit. A run
# that nobody executes (suspended, enqueued) becomes queued: runnable without
# a lease, so some instance claims it and writes its abort.
# KEYS[1]  the run hash
# ARGV[1]  the reason (not empty)
# ARGV[2]  now, unix ms (update_time_ms, when the request is new)
# ARGV[3]  the control channel
# Returns {OK, {field, value, ...}, now} | {NOT_FOUND}
REQUEST_CANCEL = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'cancel_reason')
if not f[1] then return {1} end
if f[1] ~= 'succeeded' and f[1] ~= 'failed' and f[1] ~= 'cancelled' then
  local reason = f[2]
  if not reason or reason == '' then
    reason = ARGV[1]
    redis.call('HSET', KEYS[1], 'cancel_reason', reason, 'update_time_ms', ARGV[2])
  end
  if f[1] == 'suspended' or f[1] == 'enqueued' then
    redis.call('HSET', KEYS[1], 'state', 'queued')
  end
  redis.call('PUBLISH', ARGV[3], reason)
end
return {0, redis.call('HGETALL', KEYS[1]), now_ms()}
"""
)

# Record Resume's decisions on a suspended run: compare-and-set on its epoch.
# KEYS[1]  the run hash
# KEYS[2]  the lease
# KEYS[3]  the resume requests hash
# ARGV[1]  the epoch the caller read the run at
# ARGV[2]  the decisions (replace the stored ones)
# ARGV[3]  '1' to make the run runnable again (every interrupt is answered), else '0'
# ARGV[4]  the new owner (with ARGV[3] = '1')
# ARGV[5]  lease TTL in ms
# ARGV[6]  the request id, or '' for none
# ARGV[7]  what to remember under the request id
# ARGV[8]  now, unix ms
# Returns {OK, {field, value, ...}, when the new lease lapses (0 = none)} | {NOT_FOUND}
#       | {CONFLICT}
DECIDE = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'epoch')
if not f[1] then return {1} end
if f[1] ~= 'suspended' or tonumber(f[2]) ~= tonumber(ARGV[1]) then return {7} end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'decisions', ARGV[2], 'update_time_ms', ARGV[8])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], ARGV[6], ARGV[7]) end
local lapses = 0
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'owner', ARGV[4])
  redis.call('SET', KEYS[2], epoch, 'PX', ARGV[5])
  lapses = now_ms() + tonumber(ARGV[5])
end
return {0, redis.call('HGETALL', KEYS[1]), lapses}
"""
)

# Store a new thread unless its hash exists. A new thread is idle: with an
# idle TTL it expires unless a run starts on it first.
# KEYS[1]   the thread hash
# ARGV[1]   the idle TTL in ms, 0 = none
# ARGV[2..] field, value, field, value, ... of the new record
# Returns {1} when created, {0, {field, value, ...}} with the stored record otherwise.
CREATE_THREAD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {1}
"""

# Read a thread: its record, queue and number of messages, as of one moment.
# KEYS[1..5] the thread's keys (keys.thread_keys)
# Returns {OK, {field, value, ...}, {queued run id, ...}, message count} | {NOT_FOUND}
GET_THREAD = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {1} end
return {0, fields, redis.call('LRANGE', KEYS[3], 0, -1), redis.call('LLEN', KEYS[2])}
"""

# Read entries [start, stop) of a thread's history.
# KEYS[1]  the thread hash
# KEYS[2]  the messages list
# ARGV[1]  start
# ARGV[2]  the last position (inclusive), >= start; passed through as text (Lua
#          numbers lose integer precision)
# Returns {OK, {entry, ...}} | {NOT_FOUND}
THREAD_MESSAGES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {1} end
return {0, redis.call('LRANGE', KEYS[2], ARGV[1], ARGV[2])}
"""

# Delete an idle thread: its hash, history, queue, run list and pending entries.
# KEYS[1..5] the thread's keys (keys.thread_keys)
# Returns {OK, create_time_ms, resource_id} | {NOT_FOUND} | {BUSY, run id}
DELETE_THREAD = """
local f = redis.call('HMGET', KEYS[1], 'active_run_id', 'create_time_ms', 'resource_id')
if not f[2] then return {1} end
if f[1] and f[1] ~= '' then return {9, f[1]} end
local queued = redis.call('LINDEX', KEYS[3], 0)
if queued then return {9, queued} end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return {0, f[2], f[3] or ''}
"""

# Create a run on a thread and decide, against the thread's state, whether it
# becomes the thread's active run, waits in its queue, or is refused; with
# INTERRUPT or ROLLBACK, also ask the active run to stop (as REQUEST_CANCEL
# does, recording which run interrupted it). One step, so two runs sent to an
# idle thread at once can never both become active.
# KEYS[1..5] the thread's keys (keys.thread_keys): hash, messages, queue, runs, pending
# KEYS[6]   the new run's hash
# KEYS[7]   the new run's lease
# ARGV[1]   the policy: 'reject', 'enqueue', 'interrupt' or 'rollback'
# ARGV[2]   lease TTL in ms
# ARGV[3]   the creator's epoch (the lease's value)
# ARGV[4]   the thread's key base (keys.thread_base)
# ARGV[5]   the thread id
# ARGV[6]   the new run's member in the thread's runs ZSET
# ARGV[7]   now, unix ms
# ARGV[8]   the new run's id
# ARGV[9]   the cancel reason for the active run (INTERRUPT, ROLLBACK)
# ARGV[10..] field, value, ... of the new run's record (state 'queued')
# Returns {NOT_FOUND} | {EXISTS, {field, value, ...}} | {BUSY, active run id}
#       | {OK, 'active'} | {OK, 'queued'} | {OK, 'queued', interrupted run id}
START_THREAD_RUN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {1} end
if redis.call('EXISTS', KEYS[6]) == 1 then return {10, redis.call('HGETALL', KEYS[6])} end
local active = redis.call('HGET', KEYS[1], 'active_run_id')
if not active or active == '' then
  redis.call('HSET', KEYS[6], unpack(ARGV, 10))
  redis.call('SET', KEYS[7], ARGV[3], 'PX', ARGV[2])
  redis.call('HSET', KEYS[1], 'active_run_id', ARGV[8], 'update_time_ms', ARGV[7])
  for k = 1, 5 do redis.call('PERSIST', KEYS[k]) end
  redis.call('ZADD', KEYS[4], 0, ARGV[6])
  return {0, 'active'}
end
if ARGV[1] == 'reject' then return {9, active} end
redis.call('HSET', KEYS[6], unpack(ARGV, 10))
redis.call('HSET', KEYS[6], 'state', 'enqueued', 'owner', '')
redis.call('RPUSH', KEYS[3], ARGV[8])
redis.call('ZADD', KEYS[4], 0, ARGV[6])
redis.call('HSET', KEYS[1], 'update_time_ms', ARGV[7])
if ARGV[1] ~= 'interrupt' and ARGV[1] ~= 'rollback' then return {0, 'queued'} end
local base = ARGV[4] .. string.sub(active, #ARGV[5] + 2) .. ':'
local run = base .. 'run'
local f = redis.call('HMGET', run, 'state', 'cancel_reason')
if not f[1] or f[1] == 'succeeded' or f[1] == 'failed' or f[1] == 'cancelled' then
  return {0, 'queued'}
end
local reason = f[2]
if not reason or reason == '' then
  reason = ARGV[9]
  redis.call('HSET', run, 'cancel_reason', reason, 'interrupted_by', ARGV[8],
    'update_time_ms', ARGV[7])
end
if ARGV[1] == 'rollback' then redis.call('HSET', run, 'rollback', '1') end
if f[1] == 'suspended' then redis.call('HSET', run, 'state', 'queued') end
redis.call('PUBLISH', base .. 'control', reason)
return {0, 'queued', active}
"""


def append_script(incarnation: str) -> str:
    """APPEND for the store incarnation `incarnation` (a redis-server's run_id: hex)."""
    if not incarnation.isalnum():
        raise ValueError(f"not an incarnation: {incarnation!r}")
    return APPEND.replace(_INCARNATION, incarnation)
