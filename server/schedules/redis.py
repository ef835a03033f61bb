"""RedisScheduleStore: the ScheduleStore on Redis, beside a RedisEventLog, shared by every
server. Every key is under one hash tag (server/events/keys.py); each write is one script of
scripts.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

from server.errors import ScheduleChanged, ScheduleNotFound
from server.events.keys import Keys, parse_run_index_member, run_index_member
from server.events.redis import RedisEventLog
from server.events.redis_client import RedisClient, register
from server.events.redis_records import store_errors
from server.schedules import scripts
from server.schedules.records import FIRINGS_KEPT, Firing, SchedulePageCursor, ScheduleRecord

_LIST_BATCH = 200


def _due(record: ScheduleRecord) -> str | int:
    return "" if record.due_ms is None else record.due_ms


class RedisScheduleStore:
    """A ScheduleStore on Redis; create it with `RedisScheduleStore.beside(log)`."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._create = register(client, scripts.CREATE)
        self._put = register(client, scripts.PUT)
        self._delete = register(client, scripts.DELETE)

    @classmethod
    def beside(cls, log: RedisEventLog) -> RedisScheduleStore:
        """A store sharing `log`'s connection (the log closes it)."""
        return cls(log.client, log.keys)

    async def create(self, record: ScheduleRecord) -> tuple[ScheduleRecord, bool]:
        keys = self._keys
        stored = dataclasses.replace(record, version=1)
        member = run_index_member(record.create_time_ms, record.schedule_id)
        with store_errors():
            reply = await self._create(
                keys=[keys.schedule_records, keys.schedules_due, keys.schedule_index],
                args=[record.schedule_id, stored.encode(), _due(stored), member],
            )
        if reply[0] == 1:
            return stored, True
        return ScheduleRecord.decode(reply[1]), False

    async def get(self, schedule_id: str) -> ScheduleRecord:
        with store_errors():
            stored = await self._client.hget(self._keys.schedule_records, schedule_id)
        if stored is None:
            raise ScheduleNotFound(schedule_id)
        return ScheduleRecord.decode(stored)

    async def page(
        self,
        *,
        agent_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: SchedulePageCursor | None = None,
    ) -> list[ScheduleRecord]:
        """Walk the index newest first, a batch of records at a time, filtering by agent."""
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        upper = (
            "+"
            if after is None
            else "(" + run_index_member(after.create_time_ms, after.schedule_id)
        )
        page: list[ScheduleRecord] = []
        with store_errors():
            while len(page) < limit:
                members = cast(
                    list[bytes],
                    await self._client.zrevrangebylex(
                        self._keys.schedule_index, upper, "-", start=0, num=_LIST_BATCH
                    ),
                )
                if not members:
                    break
                ids = [parse_run_index_member(m)[1] for m in members]
                stored = await self._client.hmget(self._keys.schedule_records, ids)
                for found in stored:
                    if found is None:
                        continue  # deleted after the index was read
                    record = ScheduleRecord.decode(found)
                    if (not agent_id or record.agent_id == agent_id) and (
                        tenant is None or record.owner == tenant
                    ):
                        page.append(record)
                        if len(page) == limit:
                            break
                if len(members) < _LIST_BATCH:
                    break
                upper = "(" + members[-1].decode()
        return page

    async def put(
        self, record: ScheduleRecord, *, expected_version: int, firings: Sequence[Firing] = ()
    ) -> ScheduleRecord:
        keys = self._keys
        stored = dataclasses.replace(record, version=expected_version + 1)
        added: list[Any] = []
        for firing in firings:
            added += [firing.seq, firing.encode()]
        with store_errors():
            reply = await self._put(
                keys=[
                    keys.schedule_records,
                    keys.schedules_due,
                    keys.schedule_firings(record.schedule_id),
                ],
                args=[
                    record.schedule_id,
                    expected_version,
                    stored.encode(),
                    _due(stored),
                    FIRINGS_KEPT,
                    *added,
                ],
            )
        if reply[0] == scripts.NOT_FOUND:
            raise ScheduleNotFound(record.schedule_id)
        if reply[0] == scripts.CHANGED:
            raise ScheduleChanged(record.schedule_id)
        return stored

    async def delete(self, schedule_id: str) -> None:
        record = await self.get(schedule_id)
        keys = self._keys
        with store_errors():
            reply = await self._delete(
                keys=[
                    keys.schedule_records,
                    keys.schedules_due,
                    keys.schedule_index,
                    keys.schedule_firings(schedule_id),
                ],
                args=[schedule_id, run_index_member(record.create_time_ms, schedule_id)],
            )
        if reply[0] == scripts.NOT_FOUND:
            raise ScheduleNotFound(schedule_id)

    async def due(self, now_ms: int, limit: int) -> list[str]:
        with store_errors():
            ids = await self._client.zrangebyscore(
                self._keys.schedules_due, "-inf", now_ms, start=0, num=limit
            )
        return [cast(bytes, i).decode() for i in ids]

    async def next_due_ms(self) -> int | None:
        with store_errors():
            first = await self._client.zrange(self._keys.schedules_due, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def firings(
        self, schedule_id: str, *, limit: int, before_seq: int | None = None
    ) -> list[Firing]:
        await self.get(schedule_id)
        upper: str | int = "+inf" if before_seq is None else f"({before_seq}"
        with store_errors():
            stored = await self._client.zrevrangebyscore(
                self._keys.schedule_firings(schedule_id), upper, "-inf", start=0, num=limit
            )
        return [Firing.decode(cast(bytes, member)) for member in stored]

    async def close(self) -> None:
        pass
