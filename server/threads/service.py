"""Threads as the API sees them: creating, reading, listing and deleting conversations.

Starting a run on a thread is the executor's (server/runs/executor.py); what a
thread's history holds is history.py's. Here are the rules of the thread
resource itself:

- A thread's id is the caller's thread_id, or derived from request_id
  (UUIDv5, so a retried CreateThread finds its thread with no extra key), or
  random.
- Creating is idempotent by request_id: the same request again returns the
  same thread; the same request_id with another resource_id or metadata is
  RequestIdReused. A thread_id that is taken by any other request is
  ThreadAlreadyExists.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping

from server.errors import RequestIdReused, ThreadAlreadyExists
from server.events.log import EventLog, ThreadPageCursor, ThreadRecord
from server.ids import derived_id
from server.threads.history import ThreadMessage, decode

_REQUEST_NAMESPACE = uuid.UUID("0c8b5f8e-2a57-4d0e-9a34-7b1f0f6a6d21")


def thread_id_for(request_id: str, tenant: str = "") -> str:
    """The id of a new thread the caller did not name: from request_id (and its tenant)
    if given, else random."""
    if request_id:
        return derived_id(_REQUEST_NAMESPACE, request_id, tenant)
    return uuid.uuid4().hex


class Threads:
    """The thread resource over an EventLog."""

    def __init__(self, log: EventLog) -> None:
        self._log = log

    async def create(
        self,
        *,
        thread_id: str = "",
        resource_id: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str = "",
        tenant: str = "",
    ) -> ThreadRecord:
        """A new idle thread of `tenant`, or the one this request_id created before."""
        now = time.time_ns() // 1_000_000
        record = ThreadRecord(
            thread_id=thread_id or thread_id_for(request_id, tenant),
            resource_id=resource_id,
            metadata=dict(metadata or {}),
            request_id=request_id,
            create_time_ms=now,
            update_time_ms=now,
            owner=tenant,
        )
        stored, created = await self._log.create_thread(record)
        if created:
            return stored
        if not request_id or stored.request_id != request_id:
            raise ThreadAlreadyExists(stored.thread_id)
        if (stored.resource_id, stored.metadata) != (record.resource_id, record.metadata):
            raise RequestIdReused(request_id, thread_id=stored.thread_id)
        return stored

    async def get(self, thread_id: str) -> ThreadRecord:
        return await self._log.get_thread(thread_id)

    async def page(
        self,
        *,
        resource_id: str,
        tenant: str | None = None,
        limit: int,
        after: ThreadPageCursor | None,
    ) -> list[ThreadRecord]:
        return await self._log.list_threads(
            resource_id=resource_id, tenant=tenant, limit=limit, after=after
        )

    async def delete(self, thread_id: str) -> None:
        await self._log.delete_thread(thread_id)

    async def messages(
        self, thread_id: str, *, limit: int, start: int | None, newest_first: bool
    ) -> tuple[list[ThreadMessage], int | None]:
        """A page of the thread's messages, and where the next page starts (None: the end).

        Oldest first, `start` is the first position (None: 0); newest first,
        the page ends right before `start` (None: the end of the history).
        """
        if not newest_first:
            first = start or 0
            stored = await self._log.thread_messages(thread_id, first, first + limit + 1)
            page = [decode(first + i, entry) for i, entry in enumerate(stored[:limit])]
            return page, (first + limit if len(stored) > limit else None)
        end = (await self._log.get_thread(thread_id)).message_count if start is None else start
        first = max(0, end - limit)
        stored = await self._log.thread_messages(thread_id, first, end)
        page = [decode(first + i, entry) for i, entry in enumerate(stored)]
        page.reverse()
        return page, (first if first > 0 else None)
