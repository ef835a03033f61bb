"""RedisPushStore: the PushStore on Redis, beside a RedisEventLog, shared by every server.

A run's configs and deliveries are in its slot (server/events/keys.py); the index of due
runs and their holders share the {push} hash tag. Each script touches one slot: a write
that needs both (adding a config makes its run due) is a script on the run's keys, then
one command on the index, in that order (the dispatcher's release relies on it).
"""

from __future__ import annotations

from typing import cast

from server.a2a.push.store import MAX_CONFIGS_PER_TASK, Delivery, PushConfig
from server.errors import FieldViolation, InvalidArgument
from server.events.keys import Keys
from server.events.redis import RedisEventLog
from server.events.redis_client import RedisClient, register
from server.events.redis_records import store_errors

# KEYS[1] configs, KEYS[2] deliveries; ARGV[1] config id, ARGV[2] the config, ARGV[3] the
# most configs. Returns 1, or 0 when the run has that many configs already.
_PUT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
return 1
"""

# KEYS[1] configs, KEYS[2] deliveries; ARGV[1] config id, ARGV[2] the delivery.
_RECORD = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return 0
"""

# KEYS[1] due, KEYS[2] owners; ARGV[1] owner, ARGV[2] limit, ARGV[3] hold ms.
# Returns the claimed run ids.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
  redis.call('HSET', KEYS[2], id, ARGV[1])
end
return ids
"""

# KEYS[1] due, KEYS[2] owners; ARGV[1] run id, ARGV[2] owner, ARGV[3] hold ms.
# Returns 1, or 0 when the owner does not hold the run.
_RENEW = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS[1] due, KEYS[2] owners; ARGV[1] run id, ARGV[2] owner.
_RELEASE = """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 0
"""


class RedisPushStore:
    """A PushStore on Redis; create it with `RedisPushStore.beside(log)`."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._put = register(client, _PUT)
        self._record = register(client, _RECORD)
        self._claim = register(client, _CLAIM)
        self._renew = register(client, _RENEW)
        self._release = register(client, _RELEASE)

    @classmethod
    def beside(cls, log: RedisEventLog) -> RedisPushStore:
        """A store sharing `log`'s connection (the log closes it)."""
        return cls(log.client, log.keys)

    async def put_config(self, config: PushConfig) -> None:
        keys = self._keys
        run_id = config.run_id
        with store_errors():
            stored = await self._put(
                keys=[keys.push_configs(run_id), keys.push_deliveries(run_id)],
                args=[config.config_id, config.encode(), MAX_CONFIGS_PER_TASK],
            )
            if stored == 0:
                raise InvalidArgument(
                    FieldViolation(
                        "id",
                        f"a task has at most {MAX_CONFIGS_PER_TASK} push notification configs",
                    )
                )
            # Due now, whoever held it: its holder's renewal fails, the next claim reads
            # the new config.
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(keys.push_due, {run_id: 0})
                pipe.hdel(keys.push_owners, run_id)
                await pipe.execute()

    async def configs(self, run_id: str) -> list[PushConfig]:
        with store_errors():
            stored = cast(
                dict[bytes, bytes], await self._client.hgetall(self._keys.push_configs(run_id))
            )
        configs = [PushConfig.decode(value) for value in stored.values()]
        return sorted(configs, key=lambda c: (c.create_time_ms, c.config_id))

    async def delete_config(self, run_id: str, config_id: str) -> bool:
        keys = self._keys
        with store_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hdel(keys.push_configs(run_id), config_id)
                pipe.hdel(keys.push_deliveries(run_id), config_id)
                deleted, _ = await pipe.execute()
        return bool(deleted)

    async def deliveries(self, run_id: str) -> dict[str, Delivery]:
        with store_errors():
            stored = cast(
                dict[bytes, bytes],
                await self._client.hgetall(self._keys.push_deliveries(run_id)),
            )
        return {key.decode(): Delivery.decode(value) for key, value in stored.items()}

    async def record(self, run_id: str, config_id: str, delivery: Delivery) -> None:
        keys = self._keys
        with store_errors():
            await self._record(
                keys=[keys.push_configs(run_id), keys.push_deliveries(run_id)],
                args=[config_id, delivery.encode()],
            )

    async def claim(self, owner: str, limit: int, hold_ms: int) -> list[str]:
        with store_errors():
            ids = await self._claim(
                keys=[self._keys.push_due, self._keys.push_owners], args=[owner, limit, hold_ms]
            )
        return [item.decode() for item in ids]

    async def renew(self, run_id: str, owner: str, hold_ms: int) -> bool:
        with store_errors():
            held = await self._renew(
                keys=[self._keys.push_due, self._keys.push_owners], args=[run_id, owner, hold_ms]
            )
        return bool(held)

    async def release(self, run_id: str, owner: str) -> None:
        with store_errors():
            await self._release(
                keys=[self._keys.push_due, self._keys.push_owners], args=[run_id, owner]
            )

    async def mark_due(self, run_id: str) -> None:
        with store_errors():
            await self._client.zadd(self._keys.push_due, {run_id: 0}, nx=True)

    async def expire(self, run_id: str, ttl_ms: int) -> None:
        keys = self._keys
        with store_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for key in (keys.push_configs(run_id), keys.push_deliveries(run_id)):
                    if ttl_ms > 0:
                        pipe.pexpire(key, ttl_ms)
                    else:
                        pipe.delete(key)
                pipe.zrem(keys.push_due, run_id)
                pipe.hdel(keys.push_owners, run_id)
                await pipe.execute()
