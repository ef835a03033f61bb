"""MemoryScheduleStore: the ScheduleStore in this process, beside the memory event log."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from server.errors import ScheduleChanged, ScheduleNotFound
from server.schedules.records import FIRINGS_KEPT, Firing, SchedulePageCursor, ScheduleRecord


class MemoryScheduleStore:
    """Schedules in dicts; every method runs without awaiting, so each is atomic."""

    def __init__(self) -> None:
        self._records: dict[str, ScheduleRecord] = {}
        self._firings: dict[str, list[Firing]] = {}  # oldest first

    async def create(self, record: ScheduleRecord) -> tuple[ScheduleRecord, bool]:
        existing = self._records.get(record.schedule_id)
        if existing is not None:
            return existing, False
        stored = dataclasses.replace(record, version=1)
        self._records[record.schedule_id] = stored
        self._firings[record.schedule_id] = []
        return stored, True

    async def get(self, schedule_id: str) -> ScheduleRecord:
        record = self._records.get(schedule_id)
        if record is None:
            raise ScheduleNotFound(schedule_id)
        return record

    async def page(
        self,
        *,
        agent_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: SchedulePageCursor | None = None,
    ) -> list[ScheduleRecord]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        ordered = sorted(
            self._records.values(),
            key=lambda r: (r.create_time_ms, r.schedule_id),
            reverse=True,
        )
        page = []
        for record in ordered:
            if after is not None and (record.create_time_ms, record.schedule_id) >= (
                after.create_time_ms,
                after.schedule_id,
            ):
                continue
            if agent_id and record.agent_id != agent_id:
                continue
            if tenant is not None and record.owner != tenant:
                continue
            page.append(record)
            if len(page) == limit:
                break
        return page

    async def put(
        self, record: ScheduleRecord, *, expected_version: int, firings: Sequence[Firing] = ()
    ) -> ScheduleRecord:
        current = await self.get(record.schedule_id)
        if current.version != expected_version:
            raise ScheduleChanged(record.schedule_id)
        stored = dataclasses.replace(record, version=expected_version + 1)
        self._records[record.schedule_id] = stored
        history = self._firings[record.schedule_id]
        history.extend(firings)
        del history[:-FIRINGS_KEPT]
        return stored

    async def delete(self, schedule_id: str) -> None:
        await self.get(schedule_id)
        del self._records[schedule_id]
        del self._firings[schedule_id]

    async def due(self, now_ms: int, limit: int) -> list[str]:
        due = sorted(
            (r.due_ms, r.schedule_id)
            for r in self._records.values()
            if r.due_ms is not None and r.due_ms <= now_ms
        )
        return [schedule_id for _, schedule_id in due[:limit]]

    async def next_due_ms(self) -> int | None:
        times = [r.due_ms for r in self._records.values() if r.due_ms is not None]
        return min(times, default=None)

    async def firings(
        self, schedule_id: str, *, limit: int, before_seq: int | None = None
    ) -> list[Firing]:
        await self.get(schedule_id)
        newest_first = reversed(self._firings[schedule_id])
        kept = [f for f in newest_first if before_seq is None or f.seq < before_seq]
        return kept[:limit]

    async def close(self) -> None:
        pass
