"""Where schedules live: one protocol, in memory beside the memory log, on Redis beside Redis.

Two implementations pass one contract suite (tests/contract/test_schedule_store.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.schedules.records import Firing, SchedulePageCursor, ScheduleRecord


class ScheduleStore(Protocol):
    """Schedules, the index of when each is due, and their firing history."""

    async def create(self, record: ScheduleRecord) -> tuple[ScheduleRecord, bool]:
        """Store a new schedule (at version 1) unless one with its schedule_id exists.

        Returns the stored record and whether this call created it.
        """

    async def get(self, schedule_id: str) -> ScheduleRecord:
        """The schedule. Raises ScheduleNotFound."""

    async def page(
        self,
        *,
        agent_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: SchedulePageCursor | None = None,
    ) -> list[ScheduleRecord]:
        """Up to `limit` (> 0) schedules, newest first, strictly after `after`; with
        `agent_id`, only that agent's."""

    async def put(
        self, record: ScheduleRecord, *, expected_version: int, firings: Sequence[Firing] = ()
    ) -> ScheduleRecord:
        """Replace the schedule if its stored version is `expected_version`, atomically.

        The stored record is `record` at version expected_version + 1, due at
        record.due_ms; `firings` join its history (the oldest beyond
        FIRINGS_KEPT are dropped). Returns the stored record. Raises
        ScheduleNotFound; ScheduleChanged when the version differs.
        """

    async def delete(self, schedule_id: str) -> None:
        """Delete the schedule and its history. Raises ScheduleNotFound."""

    async def due(self, now_ms: int, limit: int) -> list[str]:
        """Up to `limit` ids of schedules due at or before `now_ms`, earliest first."""

    async def next_due_ms(self) -> int | None:
        """When the earliest schedule is due; None when none is (all paused, or none)."""

    async def firings(
        self, schedule_id: str, *, limit: int, before_seq: int | None = None
    ) -> list[Firing]:
        """Up to `limit` of the schedule's kept firings, newest first, with seq below
        `before_seq` if given. Raises ScheduleNotFound."""

    async def close(self) -> None:
        """Release what the store holds (its log closes shared connections)."""
