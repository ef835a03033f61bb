"""Pick the EventLog: Redis or PostgreSQL when a URL is configured, else the embedded
memory log."""

from __future__ import annotations

from server.events.log import EventLog
from server.events.memory import MemoryEventLog
from server.events.redis import RedisEventLog


async def open_event_log(
    redis_url: str | None,
    *,
    postgres_url: str | None = None,
    key_prefix: str = "keel",
    terminal_ttl_s: float = 86_400,
    retain_events: int = 0,
    lease_ttl_s: float = 5.0,
    thread_idle_ttl_s: float = 0,
    wait_replicas: int = 0,
    wait_timeout_ms: int = 1000,
) -> EventLog:
    """A RedisEventLog on `redis_url`, a PostgresEventLog on `postgres_url` (both raise
    StoreUnavailable if unreachable; PostgreSQL also SchemaTooNew for a schema migrated by
    a newer Keel), else a MemoryEventLog.

    `key_prefix` names the Redis keys, or the PostgreSQL schema (postgres.schema_of).
    `wait_replicas` and `wait_timeout_ms` only apply to Redis: a memory log is private to
    its process.
    """
    if redis_url and postgres_url:
        raise ValueError("give one store: a Redis URL or a PostgreSQL URL, not both")
    if redis_url:
        return await RedisEventLog.connect(
            redis_url,
            key_prefix=key_prefix,
            terminal_ttl_s=terminal_ttl_s,
            retain_events=retain_events,
            lease_ttl_s=lease_ttl_s,
            thread_idle_ttl_s=thread_idle_ttl_s,
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
        )
    if postgres_url:
        from server.events.postgres import PostgresEventLog

        return await PostgresEventLog.connect(
            postgres_url,
            key_prefix=key_prefix,
            terminal_ttl_s=terminal_ttl_s,
            retain_events=retain_events,
            lease_ttl_s=lease_ttl_s,
            thread_idle_ttl_s=thread_idle_ttl_s,
        )
    return MemoryEventLog(
        terminal_ttl_s=terminal_ttl_s,
        retain_events=retain_events,
        lease_ttl_s=lease_ttl_s,
        thread_idle_ttl_s=thread_idle_ttl_s,
    )
