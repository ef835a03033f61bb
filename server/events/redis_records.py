"""How RedisEventLog stores its records in hashes, and reads its indexes.

Shared by the run side (redis.py) and the thread side (redis_threads.py):
the one mapping of Redis connectivity errors to StoreUnavailable, records
to and from hash fields, and the newest-first walk over an index ZSET.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TypeVar, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import StoreUnavailable
from server.events.keys import RunField, ThreadField, parse_run_index_member, run_index_member
from server.events.log import RunRecord, RunState, ThreadRecord
from server.events.redis_client import RedisClient

_RUN_FIELD_BYTES = {field: field.value.encode() for field in RunField}
_THREAD_FIELD_BYTES = {field: field.value.encode() for field in ThreadField}

T = TypeVar("T")


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Turn Redis connectivity errors into the domain's StoreUnavailable (the one mapping)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """HGETALL as a script returns it (field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def flatten(values: Mapping[str, str | int | bytes]) -> list[str | int | bytes]:
    """field, value, ... for HSET."""
    return [item for pair in values.items() for item in pair]


def run_fields(record: RunRecord) -> dict[str, str | int | bytes]:
    """The run hash of `record`. Optional fields are written only when set, so a run
    on its own (no thread, default retention) has no more fields than it needs."""
    values: dict[str, str | int | bytes] = {
        RunField.STATE: record.state.value,
        RunField.AGENT_ID: record.agent_id,
        RunField.INPUT: record.input,
        RunField.REQUEST_ID: record.request_id,
        RunField.OWNER: record.owner,
        RunField.EPOCH: record.epoch,
        RunField.NEXT_INDEX: record.next_index,
        RunField.EARLIEST_INDEX: record.earliest_index,
        RunField.CREATE_TIME_MS: record.create_time_ms,
        RunField.UPDATE_TIME_MS: record.update_time_ms,
        RunField.ERROR: record.error,
        RunField.CHECKPOINT: record.checkpoint,
        RunField.CANCEL_REASON: record.cancel_reason,
        RunField.DECISIONS: record.decisions,
    }
    if record.thread_id:
        values[RunField.THREAD_ID] = record.thread_id
    if record.live_only:
        values[RunField.LIVE_ONLY] = 1
    if record.terminal_ttl_ms:
        values[RunField.TTL_MS] = record.terminal_ttl_ms
    if record.until_idle:
        values[RunField.UNTIL_IDLE] = 1
    if record.schedule_id:
        values[RunField.SCHEDULE_ID] = record.schedule_id
    if record.goal:
        values[RunField.GOAL] = record.goal
    if record.trace_context:
        values[RunField.TRACE_CONTEXT] = record.trace_context
    if record.tenant:
        values[RunField.TENANT] = record.tenant
    return values


def run_from_hash(run_id: str, fields: Mapping[bytes, bytes]) -> RunRecord:
    def text(field: RunField) -> str:
        return fields.get(_RUN_FIELD_BYTES[field], b"").decode()

    def number(field: RunField) -> int:
        return int(fields.get(_RUN_FIELD_BYTES[field], b"0"))

    return RunRecord(
        run_id=run_id,
        agent_id=text(RunField.AGENT_ID),
        input=text(RunField.INPUT),
        request_id=text(RunField.REQUEST_ID),
        state=RunState(text(RunField.STATE)),
        create_time_ms=number(RunField.CREATE_TIME_MS),
        update_time_ms=number(RunField.UPDATE_TIME_MS),
        next_index=number(RunField.NEXT_INDEX),
        earliest_index=number(RunField.EARLIEST_INDEX),
        epoch=number(RunField.EPOCH),
        owner=text(RunField.OWNER),
        error=text(RunField.ERROR),
        # Bytes as stored: the client does not decode responses.
        checkpoint=fields.get(_RUN_FIELD_BYTES[RunField.CHECKPOINT], b""),
        cancel_reason=text(RunField.CANCEL_REASON),
        decisions=fields.get(_RUN_FIELD_BYTES[RunField.DECISIONS], b""),
        thread_id=text(RunField.THREAD_ID),
        live_only=number(RunField.LIVE_ONLY) == 1,
        terminal_ttl_ms=number(RunField.TTL_MS),
        interrupted_by=text(RunField.INTERRUPTED_BY),
        rollback=number(RunField.ROLLBACK) == 1,
        until_idle=number(RunField.UNTIL_IDLE) == 1,
        last_step=number(RunField.LAST_STEP),
        last_attempt=number(RunField.LAST_ATTEMPT),
        schedule_id=text(RunField.SCHEDULE_ID),
        goal=text(RunField.GOAL),
        goal_progress=text(RunField.GOAL_PROGRESS),
        trace_context=text(RunField.TRACE_CONTEXT),
        tenant=text(RunField.TENANT),
        lineage=text(RunField.LINEAGE),
    )


def thread_fields(record: ThreadRecord) -> dict[str, str | int | bytes]:
    """The thread hash of a new thread (idle, so no active run)."""
    return {
        ThreadField.RESOURCE_ID: record.resource_id,
        ThreadField.METADATA: json.dumps(record.metadata, sort_keys=True, separators=(",", ":")),
        ThreadField.REQUEST_ID: record.request_id,
        ThreadField.OWNER: record.owner,
        ThreadField.CREATE_TIME_MS: record.create_time_ms,
        ThreadField.UPDATE_TIME_MS: record.update_time_ms,
        ThreadField.ACTIVE_RUN_ID: record.active_run_id,
    }


def thread_from_hash(
    thread_id: str,
    fields: Mapping[bytes, bytes],
    queued: tuple[str, ...] = (),
    message_count: int = 0,
) -> ThreadRecord:
    def text(field: ThreadField) -> str:
        return fields.get(_THREAD_FIELD_BYTES[field], b"").decode()

    return ThreadRecord(
        thread_id=thread_id,
        resource_id=text(ThreadField.RESOURCE_ID),
        metadata=cast(dict[str, str], json.loads(text(ThreadField.METADATA) or "{}")),
        request_id=text(ThreadField.REQUEST_ID),
        create_time_ms=int(text(ThreadField.CREATE_TIME_MS) or 0),
        update_time_ms=int(text(ThreadField.UPDATE_TIME_MS) or 0),
        owner=text(ThreadField.OWNER),
        active_run_id=text(ThreadField.ACTIVE_RUN_ID),
        queued_run_ids=queued,
        message_count=message_count,
    )


async def walk_index(
    client: RedisClient,
    index: str,
    *,
    limit: int,
    after: tuple[int, str] | None,
    hash_key: Callable[[str], str],
    fields: list[str],
    accept: Callable[[str, int, dict[bytes, bytes]], T | None],
) -> list[T]:
    """Up to `limit` items of an index ZSET (run_index_member members), newest first.

    Walks the members strictly before `after` (create_time_ms, id), a batch
    at a time, reading `fields` of each member's hash in one pipeline per
    batch. `accept(id, create_time_ms, hash)` returns the item to list, or
    None to skip it (filtered out). Members whose hash is gone (expired,
    deleted) or was created at another time (a newer holder of the same id)
    are removed from the index on the way.
    """
    batch_size = min(max(2 * limit, 64), 1000)
    upper = "+" if after is None else "(" + run_index_member(*after)
    field_bytes = [field.encode() for field in fields]
    page: list[T] = []
    stale: list[bytes] = []
    with store_errors():
        async for members, rows in _batches(client, index, upper, batch_size, hash_key, fields):
            for member, row in zip(members, rows, strict=True):
                create_time_ms, item_id = parse_run_index_member(member)
                values = {
                    name: value
                    for name, value in zip(field_bytes, row, strict=True)
                    if value is not None
                }
                stored_ms = values.get(b"create_time_ms")
                if not values or stored_ms is None or int(stored_ms) != create_time_ms:
                    stale.append(member)
                    continue
                item = accept(item_id, create_time_ms, values)
                if item is not None:
                    page.append(item)
                    if len(page) == limit:
                        break
            if len(page) == limit:
                break
        if stale:
            await client.zrem(index, *stale)
    return page


async def prune_index(
    client: RedisClient,
    index: str,
    *,
    after: bytes | None,
    batch_size: int,
    hash_key: Callable[[str], str],
) -> tuple[bytes | None, int]:
    """Remove the members of an index ZSET whose hash is gone (expired, deleted) or belongs
    to a newer holder of the id, among the `batch_size` oldest after `after` (None: from the
    oldest). The last member looked at (None: the index ended there), and how many left."""
    lower = b"-" if after is None else b"(" + after
    with store_errors():
        members = cast(
            list[bytes], await client.zrangebylex(index, lower, "+", start=0, num=batch_size)
        )
        if not members:
            return None, 0
        async with client.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hget(hash_key(parse_run_index_member(member)[1]), "create_time_ms")
            stored: list[bytes | None] = await pipe.execute()
        stale = [
            member
            for member, create_time_ms in zip(members, stored, strict=True)
            if create_time_ms is None or int(create_time_ms) != parse_run_index_member(member)[0]
        ]
        if stale:
            await client.zrem(index, *stale)
    return (members[-1] if len(members) == batch_size else None), len(stale)


async def _batches(
    client: RedisClient,
    index: str,
    upper: str,
    batch_size: int,
    hash_key: Callable[[str], str],
    fields: list[str],
) -> AsyncIterator[tuple[list[bytes], list[list[bytes | None]]]]:
    """The index's members below `upper`, newest first, a batch at a time, with their hashes."""
    while True:
        members = cast(
            list[bytes],
            await client.zrevrangebylex(index, upper, "-", start=0, num=batch_size),
        )
        if not members:
            return
        async with client.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hmget(hash_key(parse_run_index_member(member)[1]), fields)
            rows: list[list[bytes | None]] = await pipe.execute()
        yield members, rows
        if len(members) < batch_size:
            return
        upper = "(" + members[-1].decode()
