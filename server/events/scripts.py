"""The Lua scripts of RedisEventLog: each is one atomic step on one run's keys.

Every script touches only the keys of one run (one hash slot, see keys.py).
Hash field names are those of keys.RunField. Results are arrays whose first
element is a status code, decoded by redis.py.
"""

from __future__ import annotations

# Status codes returned as the first element of a script's reply.
OK = 0
NOT_FOUND = 1
STALE_EPOCH = 2
INDEX_CONFLICT = 3
OFFSET_EXPIRED = 4

# Store a new run unless its hash exists.
# KEYS[1]  the run hash
# ARGV     field, value, field, value, ... of the new record
# Returns {1} when created, {0, {field, value, ...}} with the stored record otherwise.
CREATE_RUN = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return {1}
"""

# Append a batch of events, move the run's state, trim, and publish: the
# whole of EventLog.append in one atomic step, so readers and listeners only
# ever see committed events.
# KEYS[1]   the run hash
# KEYS[2]   the events ZSET
# KEYS[3]   the counters hash (gets the terminal TTL with the others)
# ARGV[1]   the writer's epoch
# ARGV[2]   new state, or '' to keep the state
# ARGV[3]   error recorded with the new state
# ARGV[4]   now, unix ms (update_time_ms)
# ARGV[5]   TTL in ms when the new state is terminal, else 0
# ARGV[6]   events to retain per run, 0 = all
# ARGV[7]   the live channel
# ARGV[8]   serialized EventBatch of the events, published after the commit ('' = none)
# ARGV[9]   index of the first event (Lua cannot parse protobuf); unused without events
# ARGV[10..] the serialized events, in index order
# Returns {OK, next_index} | {NOT_FOUND} | {STALE_EPOCH, run epoch} | {INDEX_CONFLICT, next_index}
APPEND = """
local run, events = KEYS[1], KEYS[2]
local first_event = 10  -- ARGV position of the first serialized event
local n = #ARGV - first_event + 1
local f = redis.call('HMGET', run, 'epoch', 'next_index', 'earliest_index')
if not f[1] then return {1} end
if tonumber(f[1]) ~= tonumber(ARGV[1]) then return {2, tonumber(f[1])} end
local next_index, earliest = tonumber(f[2]), tonumber(f[3]) or 0
local first = tonumber(ARGV[9])
if n > 0 and first ~= next_index then
  -- An exact replay of a committed batch (a retry after a lost reply) is a no-op.
  if first >= earliest and first + n <= next_index then
    local stored = redis.call('ZRANGEBYSCORE', events, first, first + n - 1)
    local same = #stored == n
    for i = 1, n do
      if not same then break end
      same = stored[i] == ARGV[first_event + i - 1]
    end
    if same then return {0, next_index} end
  end
  return {3, next_index}
end
-- ZADD in chunks: unpack() is limited by Lua's C stack.
local i = 1
while i <= n do
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
if ARGV[2] ~= '' then
  table.insert(update, 'state'); table.insert(update, ARGV[2])
  table.insert(update, 'error'); table.insert(update, ARGV[3])
end
local retain = tonumber(ARGV[6])
if retain > 0 and next_index - retain > earliest then
  earliest = next_index - retain
  redis.call('ZREMRANGEBYSCORE', events, '-inf', '(' .. earliest)
  table.insert(update, 'earliest_index'); table.insert(update, earliest)
end
redis.call('HSET', run, unpack(update))
local ttl_ms = tonumber(ARGV[5])
if ttl_ms > 0 then
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl_ms) end
end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
return {0, next_index}
"""

# Read a page of events, checking the run exists and the offset is retained.
# KEYS[1]  the run hash
# KEYS[2]  the events ZSET
# ARGV[1]  offset (inclusive)
# ARGV[2]  the most events to return
# Returns {OK, {member, ...}} | {NOT_FOUND} | {OFFSET_EXPIRED, earliest_index, next_index}
READ = """
local f = redis.call('HMGET', KEYS[1], 'next_index', 'earliest_index')
if not f[1] then return {1} end
local offset = tonumber(ARGV[1])
local earliest = tonumber(f[2]) or 0
if offset < earliest then return {4, earliest, tonumber(f[1])} end
if offset >= tonumber(f[1]) then return {0, {}} end
return {0, redis.call('ZRANGEBYSCORE', KEYS[2], offset, '+inf', 'LIMIT', 0, ARGV[2])}
"""

# Increment a counter of an existing run; a terminal run's TTL carries over.
# KEYS[1]  the counters hash
# KEYS[2]  the run hash
# ARGV[1]  the counter's name
# Returns {OK, new value} | {NOT_FOUND}
INCR_COUNTER = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {1} end
local value = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local ttl_ms = redis.call('PTTL', KEYS[2])
if ttl_ms > 0 then redis.call('PEXPIRE', KEYS[1], ttl_ms) end
return {0, value}
"""
