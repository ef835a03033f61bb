"""The Lua scripts of RedisScheduleStore. Every key is under the {schedules} hash tag
(server/events/keys.py), so each script touches one slot."""

OK = 0
NOT_FOUND = 1
CHANGED = 2

# KEYS[1] records, KEYS[2] due, KEYS[3] index
# ARGV[1] schedule id, ARGV[2] the record (JSON, at version 1), ARGV[3] due ms or '',
# ARGV[4] its index member
# Returns {1} when created, {0, stored record} when the id is taken.
CREATE = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then return {0, stored} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
redis.call('ZADD', KEYS[3], 0, ARGV[4])
return {1}
"""

# KEYS[1] records, KEYS[2] due, KEYS[3] the schedule's firings
# ARGV[1] schedule id, ARGV[2] expected version, ARGV[3] the new record (JSON),
# ARGV[4] due ms or '' (not due), ARGV[5] firings to keep,
# ARGV[6], ARGV[7], ...: seq, firing (JSON) pairs to add
# Returns {OK} | {NOT_FOUND} | {CHANGED}
PUT = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then return {1} end
if tonumber(cjson.decode(stored)['version']) ~= tonumber(ARGV[2]) then return {2} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
if #ARGV > 5 then
  redis.call('ZADD', KEYS[3], unpack(ARGV, 6))
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[5]) + 1))
end
return {0}
"""

# KEYS[1] records, KEYS[2] due, KEYS[3] index, KEYS[4] the schedule's firings
# ARGV[1] schedule id, ARGV[2] its index member
# Returns {OK} | {NOT_FOUND}
DELETE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return {1} end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4])
return {0}
"""
