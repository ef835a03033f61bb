"""The PushStore beside an EventLog: in memory beside the memory log, on Redis beside Redis,
on PostgreSQL beside PostgreSQL."""

from __future__ import annotations

from server.a2a.push.memory import MemoryPushStore
from server.a2a.push.store import PushStore
from server.events.log import EventLog
from server.events.memory import MemoryEventLog
from server.events.redis import RedisEventLog


def push_store_for(log: EventLog) -> PushStore:
    """The PushStore that shares `log`'s store (and its connections, on Redis and
    PostgreSQL)."""
    if isinstance(log, MemoryEventLog):
        return MemoryPushStore()
    if isinstance(log, RedisEventLog):
        from server.a2a.push.redis import RedisPushStore

        return RedisPushStore.beside(log)
    from server.events.postgres import PostgresEventLog

    if isinstance(log, PostgresEventLog):
        from server.a2a.push.postgres import PostgresPushStore

        return PostgresPushStore.beside(log)
    raise TypeError(f"no push store for a {type(log).__name__}")
