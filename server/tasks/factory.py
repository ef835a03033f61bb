"""The TaskStore beside an EventLog: in memory beside the memory log, on Redis beside Redis,
on PostgreSQL beside PostgreSQL."""

from __future__ import annotations

from server.events.log import EventLog
from server.events.memory import MemoryEventLog
from server.events.redis import RedisEventLog
from server.tasks.memory import MemoryTaskStore
from server.tasks.store import TaskStore


def task_store_for(log: EventLog, *, lease_ttl_s: float) -> TaskStore:
    """The TaskStore that shares `log`'s store (and its connections, on Redis and
    PostgreSQL)."""
    if isinstance(log, MemoryEventLog):
        return MemoryTaskStore(log, lease_ttl_s=lease_ttl_s)
    if isinstance(log, RedisEventLog):
        from server.tasks.redis import RedisTaskStore

        return RedisTaskStore.beside(log, lease_ttl_s=lease_ttl_s)
    from server.events.postgres import PostgresEventLog

    if isinstance(log, PostgresEventLog):
        from server.tasks.postgres import PostgresTaskStore

        return PostgresTaskStore.beside(log, lease_ttl_s=lease_ttl_s)
    raise TypeError(f"no task store for a {type(log).__name__}")
