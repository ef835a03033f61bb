"""The ScheduleStore beside an EventLog: in memory beside the memory log, on Redis beside
Redis."""

from __future__ import annotations

from server.events.log import EventLog
from server.events.memory import MemoryEventLog
from server.events.redis import RedisEventLog
from server.schedules.memory import MemoryScheduleStore
from server.schedules.store import ScheduleStore


def schedule_store_for(log: EventLog) -> ScheduleStore:
    """The ScheduleStore that shares `log`'s store (and its connection, on Redis)."""
    if isinstance(log, MemoryEventLog):
        return MemoryScheduleStore()
    if isinstance(log, RedisEventLog):
        from server.schedules.redis import RedisScheduleStore

        return RedisScheduleStore.beside(log)
    raise TypeError(f"no schedule store for a {type(log).__name__}")
