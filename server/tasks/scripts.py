"""The Lua scripts of RedisTaskStore: each is one atomic step on one slot.

A task's scripts touch its hash and lease and its run's task log (all in its
run's slot, see server/events/keys.py), and, for a late result of a run on a
thread, that thread's keys (the same slot). Every change appends a JSON entry
to the run's task log (the fields of records.log_entry, built here with
cjson) and publishes "log" on the run's task channel. The slot scripts touch
only the task runner's shared keys (one hash tag of their own). Replies are
arrays whose first element is a status code, decoded by redis.py.
"""

from __future__ import annotations

OK = 0
NOT_FOUND = 1
STALE = 2  # the task's epoch moved on, or it is not running
ENDED = 3  # the task has ended: nothing to start
LEASE_HELD = 4  # a runner holds the task's lease
NOT_YET = 5  # a retrying task's backoff has not passed
NOT_RETRYABLE = 6  # only a failed or cancelled task can be retried
CANCEL_REQUESTED = 7  # renewed, but the task was asked to stop

# The Lua helper every script that logs shares (a task log entry from a hash).
_LOG = """
local function log(task, log_key, channel, status, attempt, progress, message, result)
  local f = redis.call('HMGET', task, 'task_id', 'tool_name', 'tool_call_id')
  local now = redis.call('TIME')
  redis.call('RPUSH', log_key, cjson.encode({
    time_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000),
    task_id = f[1], name = f[2], tool_call_id = f[3], status = status,
    attempt = tonumber(attempt), progress = tonumber(progress) or 0,
    message = message or '', result_json = result or ''}))
  redis.call('PUBLISH', channel, 'log')
end
local function ended(status)
  return status == 'completed' or status == 'failed' or status == 'cancelled'
end
"""

# Store a new task unless it exists.
# KEYS[1]  the task hash
# KEYS[2]  the run's task ids SET
# KEYS[3]  the run's task log
# KEYS[4]  the run hash (a task lives and expires with its run)
# ARGV[1]  the run's task channel
# ARGV[2]  the task id
# ARGV[3..] field, value, ... of the new task (status 'queued')
# Returns {1} when created, {0, {field, value, ...}} with the stored task otherwise.
CREATE = (
    _LOG
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('HGETALL', KEYS[1])} end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
log(KEYS[1], KEYS[3], ARGV[1], 'queued', 0, 0, '', '')
local ttl = redis.call('PTTL', KEYS[4])
if ttl > 0 then for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ttl) end end
return {1}
"""
)

# Start the task's next attempt (see TaskStore.start_task).
# KEYS[1]  the task hash
# KEYS[2]  the task lease
# KEYS[3]  the run's task log
# ARGV[1]  the run's task channel
# ARGV[2]  the new owner
# ARGV[3]  lease TTL in ms
# ARGV[4]  now, unix ms
# Returns {OK, {field, value, ...}} | {NOT_FOUND} | {ENDED} | {LEASE_HELD} | {NOT_YET}
START = (
    _LOG
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'not_before_ms')
if not f[1] then return {1} end
if ended(f[1]) then return {3} end
if f[1] == 'running' and redis.call('EXISTS', KEYS[2]) == 1 then return {4} end
if f[1] == 'retrying' and tonumber(f[3]) > tonumber(ARGV[4]) then return {5} end
local attempt = tonumber(f[2]) + 1
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'attempt', attempt, 'owner', ARGV[2],
  'update_time_ms', ARGV[4])
redis.call('SET', KEYS[2], epoch, 'PX', ARGV[3])
log(KEYS[1], KEYS[3], ARGV[1], 'running', attempt, 0, '', '')
return {0, redis.call('HGETALL', KEYS[1])}
"""
)

# Extend the lease of the attempt at an epoch.
# KEYS[1]  the task hash
# KEYS[2]  the task lease
# ARGV[1]  the epoch
# ARGV[2]  lease TTL in ms
# Returns {OK} | {STALE} | {CANCEL_REQUESTED}: the runner stops the attempt even if
# the cancel request's message never reached it.
RENEW = """
local f = redis.call('HMGET', KEYS[1], 'status', 'epoch', 'cancel_reason')
if f[1] ~= 'running' or tonumber(f[2]) ~= tonumber(ARGV[1]) then return {2} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if f[3] and f[3] ~= '' then return {7} end
return {0}
"""

# Record a running attempt's progress.
# KEYS[1]  the task hash
# KEYS[2]  the run's task log
# ARGV[1]  the run's task channel
# ARGV[2]  the epoch
# ARGV[3]  progress, 0 to 1
# ARGV[4]  the tool's message
# ARGV[5]  now, unix ms
# Returns {OK} | {STALE, epoch}
PROGRESS = (
    _LOG
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'epoch', 'attempt')
if f[1] ~= 'running' or tonumber(f[2]) ~= tonumber(ARGV[2]) then
  return {2, tonumber(f[2]) or 0}
end
redis.call('HSET', KEYS[1], 'progress', ARGV[3], 'update_time_ms', ARGV[5])
log(KEYS[1], KEYS[2], ARGV[1], 'progress', f[3], ARGV[3], ARGV[4], '')
return {0}
"""
)

# End the attempt at an epoch (see TaskStore.finish_task).
# KEYS[1]  the task hash
# KEYS[2]  the task lease
# KEYS[3]  the run's task log
# KEYS[4]  the run hash
# KEYS[5..9] for a late result of a run on a thread: the thread's keys (keys.thread_keys)
# ARGV[1]  the run's task channel
# ARGV[2]  the epoch
# ARGV[3]  the new status: 'completed', 'failed', 'cancelled' or 'retrying'
# ARGV[4]  the result (JSON), for 'completed'
# ARGV[5]  the error, or the reason
# ARGV[6]  unix ms when a retrying task is due again
# ARGV[7]  now, unix ms
# ARGV[8]  the thread entry of the outcome ('' for none)
# ARGV[9]  the thread's idle TTL in ms, 0 = none
# Returns {OK, {field, value, ...}} | {STALE, epoch}
FINISH = (
    _LOG
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'epoch', 'attempt', 'failures', 'progress',
  'until_idle')
if f[1] ~= 'running' or tonumber(f[2]) ~= tonumber(ARGV[2]) then
  return {2, tonumber(f[2]) or 0}
end
local status = ARGV[3]
local failures = tonumber(f[4])
if status == 'retrying' or status == 'failed' then failures = failures + 1 end
local progress = f[5]
if status == 'completed' then progress = 1 end
local attempt = tonumber(f[3])
local not_before = 0
if status == 'retrying' then not_before = ARGV[6] end
redis.call('HSET', KEYS[1], 'status', status, 'result_json', ARGV[4], 'error', ARGV[5],
  'failures', failures, 'progress', progress, 'not_before_ms', not_before,
  'update_time_ms', ARGV[7])
redis.call('DEL', KEYS[2])
local logged = attempt
if status == 'retrying' then logged = attempt + 1 end
log(KEYS[1], KEYS[3], ARGV[1], status, logged, progress, ARGV[5], ARGV[4])
if ARGV[8] ~= '' and #KEYS >= 9 and f[6] ~= '1' and redis.call('EXISTS', KEYS[5]) == 1 then
  -- A late result: to the history of an idle thread, else after the active run's own.
  local active = redis.call('HGET', KEYS[5], 'active_run_id')
  if active and active ~= '' then
    redis.call('RPUSH', KEYS[9], ARGV[8])
  else
    redis.call('RPUSH', KEYS[6], ARGV[8])
    redis.call('HSET', KEYS[5], 'update_time_ms', ARGV[7])
    local idle_ms = tonumber(ARGV[9])
    if idle_ms > 0 then for k = 5, 9 do redis.call('PEXPIRE', KEYS[k], idle_ms) end end
  end
end
local ttl = redis.call('PTTL', KEYS[4])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {0, redis.call('HGETALL', KEYS[1])}
"""
)

# Stop a task that has not ended (see TaskStore.cancel_task).
# KEYS[1]  the task hash
# KEYS[2]  the run's task log
# ARGV[1]  the run's task channel
# ARGV[2]  the reason
# ARGV[3]  now, unix ms
# ARGV[4]  the task id
# Returns {OK, {field, value, ...}} | {NOT_FOUND}
CANCEL = (
    _LOG
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'cancel_reason', 'attempt')
if not f[1] then return {1} end
if not ended(f[1]) then
  local reason = f[2]
  if not reason or reason == '' then
    reason = ARGV[2]
    redis.call('HSET', KEYS[1], 'cancel_reason', reason)
  end
  if f[1] == 'running' then
    redis.call('PUBLISH', ARGV[1], 'cancel:' .. ARGV[4])  -- its runner stops it
  else
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'error', reason,
      'update_time_ms', ARGV[3])
    log(KEYS[1], KEYS[2], ARGV[1], 'cancelled', f[3], 0, reason, '')
  end
end
return {0, redis.call('HGETALL', KEYS[1])}
"""
)

# Queue a failed or cancelled task again.
# KEYS[1]  the task hash
# KEYS[2]  the run's task log
# ARGV[1]  the run's task channel
# ARGV[2]  now, unix ms
# Returns {OK, {field, value, ...}} | {NOT_FOUND} | {NOT_RETRYABLE, status}
RETRY = (
    _LOG
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not f[1] then return {1} end
if f[1] ~= 'failed' and f[1] ~= 'cancelled' then return {6, f[1]} end
redis.call('HSET', KEYS[1], 'status', 'queued', 'failures', 0, 'error', '', 'result_json', '',
  'cancel_reason', '', 'not_before_ms', 0, 'progress', 0, 'update_time_ms', ARGV[2])
log(KEYS[1], KEYS[2], ARGV[1], 'queued', f[2], 0, '', '')
return {0, redis.call('HGETALL', KEYS[1])}
"""
)

# Take a global slot and one of an agent's, both or neither (re-entrant).
# KEYS[1]  the global slots ZSET
# KEYS[2]  the agent's slots ZSET
# ARGV[1]  the task id
# ARGV[2]  now, unix ms (holders whose lease ended before are dropped)
# ARGV[3]  the hold's expiry, unix ms
# ARGV[4]  the global limit
# ARGV[5]  the agent's limit, 0 = none
# Returns 1 when held, 0 when every global slot is taken, -1 when the agent's are.
ACQUIRE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
  local agent_limit = tonumber(ARGV[5])
  if agent_limit > 0 and redis.call('ZCARD', KEYS[2]) >= agent_limit then return -1 end
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""
