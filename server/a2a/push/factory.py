"""The PushStore beside an EventLog: in memory beside the memory log, on Redis beside Redis."""

from __future__ import annotations

from server.a2a.push.memory import MemoryPushStore
from server.a2a.push.store import PushStore
from server.events.log import EventLog
from server.events.memory import MemoryEventLog
from server.events.redis import RedisEventLog


def push_store_for(log: EventLog) -> PushStore:
    """The PushStore that shares `log`'s store (and its connection, on Redis)."""
    if isinstance(log, MemoryEventLog):
        return MemoryPushStore()
    if isinstance(log, RedisEventLog):
        from server.a2a.push.redis import RedisPushStore

        return RedisPushStore.beside(log)
    raise TypeError(f"no push store for a {type(log).__name__}")
