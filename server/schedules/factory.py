"""The ScheduleStore beside an EventLog: in memory beside the memory log, on Redis beside
Redis, on PostgreSQL beside PostgreSQL."""

from __future__ import annotations

from server.events.log import EventLog
from server.events.memory import MemoryEventLog
from server.events.redis import RedisEventLog
from server.schedules.memory import MemoryScheduleStore
from server.schedules.store import ScheduleStore


def schedule_store_for(log: EventLog) -> ScheduleStore:
    """The ScheduleStore that shares `log`'s store (and its connections, on Redis and
    PostgreSQL)."""
    if isinstance(log, MemoryEventLog):
        return MemoryScheduleStore()
    if isinstance(log, RedisEventLog):
        from server.schedules.redis import RedisScheduleStore

        return RedisScheduleStore.beside(log)
    from server.events.postgres import PostgresEventLog

    if isinstance(log, PostgresEventLog):
        from server.schedules.postgres import PostgresScheduleStore

        return PostgresScheduleStore.beside(log)
    raise TypeError(f"no schedule store for a {type(log).__name__}")
