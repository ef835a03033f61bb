"""The ticker: every server fires the schedules that are due, each tick exactly once.

Each server looks for due schedules (ScheduleStore.due: a tick has come, or
a decided firing waits to be carried out) when the earliest one is due, and
at least every poll_interval_s. For each due schedule whose agent it serves:

1. Decide (a compare-and-set of the record, so of the servers that race on
   a tick exactly one decides it): of the ticks since the schedule's
   next_tick_ms, the latest fires if it is within the catch-up window,
   unless the overlap policy is SKIP and the previous firing's run (a
   THREADED schedule: any run of its thread) is still active; every other
   tick is MISSED. The decision is stored as the record's `pending` firing,
   with the ids of the run to start: they derive from the schedule and the
   tick.
2. Carry it out: start the run through the executor's idempotent start
   (THREADLESS: on a fresh thread made for the tick; THREADED: on the
   schedule's thread, in its queue if it is busy).
3. Commit (another compare-and-set): record the firings, move next_tick_ms
   on to the first tick after the decision, clear `pending`.

A server that dies after 1 leaves `pending` behind, due at once: whichever
server looks next carries out the same decision (starting the same run is
a no-op the second time) and commits it. A request that changes the
schedule in between (UpdateSchedule) leaves `pending` alone, and the commit
keeps the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from server import metrics
from server.errors import (
    InvalidArgument,
    RequestIdReused,
    RunNotFound,
    ScheduleChanged,
    ScheduleNotFound,
    ServerDraining,
    StoreUnavailable,
    ThreadBusy,
    ThreadNotFound,
)
from server.events.log import BusyPolicy, EventLog, ThreadRecord
from server.goals.records import Goal
from server.runs.admission import run_id_for
from server.runs.executors import Executor
from server.schedules.cron import Cron
from server.schedules.records import (
    MISSED_RECORDED,
    Firing,
    Outcome,
    Overlap,
    Pending,
    ScheduleRecord,
    ThreadMode,
    firing_ids,
    own_thread_id,
)
from server.schedules.store import ScheduleStore
from server.tasks.runner import stop_if_cancelled

log = logging.getLogger(__name__)

_DUE_BATCH = 100
_COMMIT_TRIES = 10


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Ticker:
    """Fires this server's due schedules; see the module docstring."""

    def __init__(
        self,
        store: ScheduleStore,
        log_: EventLog,
        executor: Executor,
        *,
        poll_interval_s: float = 1.0,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._log = log_
        self._executor = executor
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._draining = False

    @property
    def store(self) -> ScheduleStore:
        return self._store

    def open(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._tick_forever(), name="schedule-ticker")

    def wake(self) -> None:
        """Look again now: a schedule was created or changed here."""
        self._wakeup.set()

    async def drain(self) -> None:
        self._draining = True
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def tick_once(self) -> int:
        """Fire what is due now; returns how many firings this server carried out."""
        fired = 0
        for schedule_id in await self._store.due(self._clock(), _DUE_BATCH):
            if self._draining:
                break
            try:
                if await self.fire(schedule_id):
                    fired += 1
            except (StoreUnavailable, ServerDraining):
                raise
            except Exception:  # one broken schedule must not stop the others
                log.exception("schedule %s: firing failed; trying again later", schedule_id)
        return fired

    async def fire(self, schedule_id: str) -> bool:
        """Steps 1 to 3 of the module docstring for one schedule, if it is due."""
        try:
            return await self._fire(schedule_id)
        except ScheduleNotFound:
            return False  # deleted since the due index was read (a run it started stays)

    async def _fire(self, schedule_id: str) -> bool:
        record = await self._store.get(schedule_id)
        if record.agent_id not in self._executor.agents:
            return False  # a server that runs the agent fires it
        if record.pending is None:
            now = self._clock()
            if record.due_ms is None or record.due_ms > now:
                return False
            pending = await self._decide(record, now)
            try:
                record = await self._store.put(
                    dataclasses.replace(record, pending=pending), expected_version=record.version
                )
            except ScheduleChanged:
                return False  # another server decided first (or a request changed it)
        await self._carry_out(record)
        return True

    async def _decide(self, record: ScheduleRecord, now: int) -> Pending:
        cron = Cron.parse(record.cron, record.timezone)
        next_tick = cron.next_after(now)
        latest = cron.latest_at_or_before(now)
        if latest < record.next_tick_ms:  # nothing came due after all
            return Pending(record.next_tick_ms, next_tick, now)
        earlier = tuple(t for t in cron.before(latest, MISSED_RECORDED) if t >= record.next_tick_ms)
        if now - latest > record.catch_up_window_ms:
            return Pending(record.next_tick_ms, next_tick, now, missed=(latest, *earlier))
        decided = Pending(record.next_tick_ms, next_tick, now, tick_ms=latest, missed=earlier)
        if record.overlap is Overlap.SKIP:
            active = await self._active_run(record)
            if active:
                return dataclasses.replace(decided, outcome=Outcome.SKIPPED, detail=active)
        request_id, thread_id = self._firing_ids(record, str(latest))
        return dataclasses.replace(
            decided,
            outcome=Outcome.STARTED,
            request_id=request_id,
            thread_id=thread_id,
            run_id=run_id_for(request_id, thread_id, record.owner),
        )

    async def _active_run(self, record: ScheduleRecord) -> str:
        """The run that makes a SKIP schedule skip a tick, or "": THREADED, any run that
        has its thread; THREADLESS, the previous firing's run while it has not ended."""
        if record.thread_mode is ThreadMode.THREADED:
            try:
                thread = await self._log.get_thread(record.thread_id)
            except ThreadNotFound:
                return ""
            return thread.active_run_id or next(iter(thread.queued_run_ids), "")
        if not record.last_run_id:
            return ""
        try:
            previous = await self._log.get_run(record.last_run_id)
        except RunNotFound:
            return ""
        return "" if previous.state.terminal else previous.run_id

    async def _carry_out(self, record: ScheduleRecord) -> None:
        pending = record.pending
        assert pending is not None
        at = self._clock()
        firings = [(t, Outcome.MISSED, "", "") for t in reversed(pending.missed)]
        last_run_id = record.last_run_id
        if pending.outcome is Outcome.SKIPPED:
            firings.append((pending.tick_ms, Outcome.SKIPPED, "", pending.detail))
        elif pending.outcome is Outcome.STARTED:
            try:
                last_run_id, _ = await start_firing(
                    self._log, self._executor, record, pending.request_id, pending.thread_id
                )
                firings.append((pending.tick_ms, Outcome.STARTED, last_run_id, ""))
            except (InvalidArgument, ThreadNotFound, ThreadBusy) as exc:
                log.warning("schedule %s: tick not started: %s", record.schedule_id, exc)
                firings.append((pending.tick_ms, Outcome.FAILED, "", str(exc)))
        await self._commit(record, pending, firings, last_run_id, at)
        for _, outcome, _, _ in firings:
            metrics.SCHEDULE_FIRINGS.labels(outcome.value).inc()

    async def _commit(
        self,
        record: ScheduleRecord,
        pending: Pending,
        firings: list[tuple[int, Outcome, str, str]],
        last_run_id: str,
        at: int,
    ) -> None:
        for _ in range(_COMMIT_TRIES):
            numbered = [
                Firing(record.firing_seq + i + 1, tick, outcome, at, run_id, detail)
                for i, (tick, outcome, run_id, detail) in enumerate(firings)
            ]
            # A request that changed the cadence meanwhile set next_tick_ms itself.
            moved = record.next_tick_ms != pending.from_tick_ms
            committed = dataclasses.replace(
                record,
                pending=None,
                next_tick_ms=record.next_tick_ms if moved else pending.next_tick_ms,
                last_run_id=last_run_id,
                firing_seq=record.firing_seq + len(numbered),
            )
            try:
                await self._store.put(committed, expected_version=record.version, firings=numbered)
                return
            except ScheduleChanged:
                record = await self._store.get(record.schedule_id)
                if record.pending != pending:
                    return  # another server committed it
        raise ScheduleChanged(record.schedule_id)

    @staticmethod
    def _firing_ids(record: ScheduleRecord, key: str) -> tuple[str, str]:
        if record.thread_mode is ThreadMode.THREADED:
            return f"schedule:{record.schedule_id}:{key}", record.thread_id
        return firing_ids(record.schedule_id, key)

    async def _tick_forever(self) -> None:
        while not self._draining:
            delay_s = self._poll_interval_s
            try:
                await self.tick_once()
                next_due = await self._store.next_due_ms()
                if next_due is not None and next_due > self._clock():
                    delay_s = min(delay_s, (next_due - self._clock() + 1) / 1000)
            except StoreUnavailable as exc:
                stop_if_cancelled()
                log.warning("firing schedules failed: %s", exc)
            except ServerDraining:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._wakeup.wait()
            self._wakeup.clear()


async def start_firing(
    event_log: EventLog,
    executor: Executor,
    record: ScheduleRecord,
    request_id: str,
    thread_id: str,
) -> tuple[str, bool]:
    """Start the run of one firing (idempotent: its ids derive from the firing); its id,
    and whether this call made it (False: an earlier call did).

    A THREADLESS firing runs on a fresh thread made for it; a THREADED one on
    the schedule's thread (made on its first firing, unless the schedule
    names a thread of the caller's), in its queue if a run has it.
    """
    threaded = record.thread_mode is ThreadMode.THREADED
    if not threaded or thread_id == own_thread_id(record.schedule_id):
        # Made for the firing, or the schedule's own thread (made again if deleted).
        await _ensure_thread(event_log, thread_id, record.schedule_id, record.owner)
    try:
        started = await executor.start(
            record.agent_id,
            record.input,
            request_id,
            thread_id=thread_id,
            policy=BusyPolicy.ENQUEUE if threaded else BusyPolicy.REJECT,
            goal=Goal.decode(record.goal),
            schedule_id=record.schedule_id,
            tenant=record.owner,
        )
    except RequestIdReused as exc:
        return exc.run_id, False  # started before, and the schedule's input changed since
    started.launch()
    return started.run.run_id, started.created


async def ensure_own_thread(event_log: EventLog, schedule_id: str, tenant: str = "") -> str:
    """Make a THREADED schedule's own thread (its tenant's), unless it exists; its id."""
    thread_id = own_thread_id(schedule_id)
    await _ensure_thread(event_log, thread_id, schedule_id, tenant)
    return thread_id


async def _ensure_thread(
    event_log: EventLog, thread_id: str, schedule_id: str, tenant: str
) -> None:
    now = now_ms()
    await event_log.create_thread(
        ThreadRecord(
            thread_id=thread_id,
            resource_id="",
            metadata={"schedule_id": schedule_id},
            request_id="",
            create_time_ms=now,
            update_time_ms=now,
            owner=tenant,
        )
    )
