"""Schedules as the API sees them: creating, reading, changing, deleting and triggering.

What a tick does is the ticker's (ticker.py); here are the rules of the
schedule resource itself:

- A schedule's id is the caller's schedule_id, or derived from request_id
  (UUIDv5, so a retried CreateSchedule finds its schedule), or random.
- Creating is idempotent by request_id: the same request again returns the
  schedule it made; the same request_id with other fields is RequestIdReused.
  A schedule_id taken by any other request is ScheduleAlreadyExists.
- Everything about a schedule is checked before it is stored (its agent and
  input, cron expression and time zone, goal, policy for its thread mode,
  thread), so nothing is half-created.
- A new cron expression or time zone, and an unpause, start the cadence
  again from now; pausing stops it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.errors import (
    FieldViolation,
    InvalidArgument,
    RequestIdReused,
    ScheduleAlreadyExists,
    ScheduleChanged,
)
from server.events.log import EventLog, RunRecord
from server.goals.judge import judge_of
from server.goals.records import Goal
from server.runs.executors import Executor
from server.schedules.cron import Cron, CronError
from server.schedules.records import (
    FIRINGS_KEPT,
    Firing,
    Outcome,
    Overlap,
    SchedulePageCursor,
    ScheduleRecord,
    ThreadMode,
    firing_ids,
    own_thread_id,
    schedule_id_for,
)
from server.schedules.store import ScheduleStore
from server.schedules.ticker import Ticker, ensure_own_thread, now_ms, start_firing

NEXT_FIRE_TIMES = 5
RECENT_FIRINGS = 10
_WRITE_TRIES = 10

# The fields UpdateSchedule may change (its update_mask paths).
UPDATABLE = frozenset(
    {"agent_id", "cron", "timezone", "input", "overlap_policy", "catch_up_window", "paused", "goal"}
)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What a request says a schedule is."""

    agent_id: str
    cron: str
    timezone: str
    input: str
    thread_mode: ThreadMode
    overlap: Overlap
    catch_up_window_ms: int
    paused: bool = False
    goal: Goal | None = None
    thread_id: str = ""  # THREADED: a thread of the caller's; "": the schedule's own


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """A schedule with what GetSchedule shows beside it."""

    record: ScheduleRecord
    next_fire_times_ms: tuple[int, ...]
    recent_firings: tuple[Firing, ...]


class Schedules:
    """The schedule resource over a ScheduleStore; see the module docstring."""

    def __init__(
        self, store: ScheduleStore, log: EventLog, executor: Executor, ticker: Ticker
    ) -> None:
        self._store = store
        self._log = log
        self._executor = executor
        self._ticker = ticker

    async def create(
        self,
        spec: ScheduleSpec,
        *,
        schedule_id: str = "",
        request_id: str = "",
        tenant: str = "",
    ) -> ScheduleRecord:
        """A new schedule of `tenant`, or the one this request_id created before."""
        cron = await self._check(spec)
        now = now_ms()
        schedule_id = schedule_id or schedule_id_for(request_id, tenant)
        threaded = spec.thread_mode is ThreadMode.THREADED
        record = ScheduleRecord(
            schedule_id=schedule_id,
            agent_id=spec.agent_id,
            cron=cron.expression,
            timezone=cron.timezone,
            input=spec.input,
            thread_mode=spec.thread_mode,
            overlap=spec.overlap,
            catch_up_window_ms=spec.catch_up_window_ms,
            paused=spec.paused,
            request_id=request_id,
            thread_id=(spec.thread_id or own_thread_id(schedule_id)) if threaded else "",
            goal="" if spec.goal is None else spec.goal.encode(),
            create_time_ms=now,
            update_time_ms=now,
            next_tick_ms=0 if spec.paused else cron.next_after(now),
            extra={"request_digest": _digest(spec, schedule_id)} if request_id else {},
            owner=tenant,
        )
        if threaded and not spec.thread_id:
            # The schedule's own thread, made now so that it can be read at once (its id
            # derives from the schedule's: whichever request makes the schedule owns it).
            await ensure_own_thread(self._log, schedule_id, tenant)
        stored, created = await self._store.create(record)
        if created:
            self._ticker.wake()
            return stored
        if not request_id or stored.request_id != request_id:
            raise ScheduleAlreadyExists(stored.schedule_id)
        if stored.extra.get("request_digest") != _digest(spec, schedule_id):
            raise RequestIdReused(request_id, schedule_id=stored.schedule_id)
        return stored

    async def get(self, schedule_id: str) -> ScheduleView:
        record = await self._store.get(schedule_id)
        firings = await self._store.firings(schedule_id, limit=RECENT_FIRINGS)
        return ScheduleView(record, next_fire_times(record), tuple(firings))

    async def page(
        self,
        *,
        agent_id: str,
        tenant: str | None = None,
        limit: int,
        after: SchedulePageCursor | None,
    ) -> list[ScheduleView]:
        records = await self._store.page(agent_id=agent_id, tenant=tenant, limit=limit, after=after)
        return [ScheduleView(r, next_fire_times(r), ()) for r in records]

    async def update(self, schedule_id: str, changes: Mapping[str, Any]) -> ScheduleView:
        """Apply `changes` (update_mask path -> new value, shape-checked by the caller)."""
        for _ in range(_WRITE_TRIES):
            record = await self._store.get(schedule_id)
            spec = dataclasses.replace(
                _spec(record),
                **{_SPEC_FIELDS[path]: value for path, value in changes.items()},
            )
            cron = await self._check(spec, thread_checked=True)
            now = now_ms()
            cadence = (cron.expression, cron.timezone) != (record.cron, record.timezone) or (
                record.paused and not spec.paused
            )
            next_tick = record.next_tick_ms
            if spec.paused:
                next_tick = 0
            elif cadence:
                next_tick = cron.next_after(now)
            changed = dataclasses.replace(
                record,
                agent_id=spec.agent_id,
                cron=cron.expression,
                timezone=cron.timezone,
                input=spec.input,
                overlap=spec.overlap,
                catch_up_window_ms=spec.catch_up_window_ms,
                paused=spec.paused,
                goal="" if spec.goal is None else spec.goal.encode(),
                update_time_ms=now,
                next_tick_ms=next_tick,
            )
            try:
                stored = await self._store.put(changed, expected_version=record.version)
            except ScheduleChanged:
                continue  # a tick (or another request) wrote it first: apply to the new one
            self._ticker.wake()
            firings = await self._store.firings(schedule_id, limit=RECENT_FIRINGS)
            return ScheduleView(stored, next_fire_times(stored), tuple(firings))
        raise ScheduleChanged(schedule_id)

    async def delete(self, schedule_id: str) -> None:
        await self._store.delete(schedule_id)

    async def trigger(self, schedule_id: str, request_id: str = "") -> tuple[RunRecord, Firing]:
        """Fire the schedule now, whatever its cadence, pause or overlap policy."""
        record = await self._store.get(schedule_id)
        key = f"trigger:{request_id or uuid.uuid4().hex}"
        if record.thread_mode is ThreadMode.THREADED:
            run_request_id, thread_id = f"schedule:{schedule_id}:{key}", record.thread_id
        else:
            run_request_id, thread_id = firing_ids(schedule_id, key)
        run_id, created = await start_firing(
            self._log, self._executor, record, run_request_id, thread_id
        )
        run = await self._log.get_run(run_id)
        if not created:  # a repeated request: its firing is recorded already, unless the
            # first one died between starting the run and recording it
            kept = await self._store.firings(schedule_id, limit=FIRINGS_KEPT)
            for firing in kept:
                if firing.run_id == run_id:
                    return run, firing
            if kept and len(kept) == FIRINGS_KEPT and kept[-1].fire_time_ms > run.create_time_ms:
                # Recorded so long ago that it is no longer kept.
                return run, Firing(0, run.create_time_ms, Outcome.TRIGGERED, 0, run_id)
        for _ in range(_WRITE_TRIES):
            record = await self._store.get(schedule_id)
            firing = Firing(
                record.firing_seq + 1, run.create_time_ms, Outcome.TRIGGERED, now_ms(), run_id
            )
            triggered = dataclasses.replace(record, last_run_id=run_id, firing_seq=firing.seq)
            try:
                await self._store.put(triggered, expected_version=record.version, firings=[firing])
                return run, firing
            except ScheduleChanged:
                continue
        raise ScheduleChanged(schedule_id)

    async def firings(
        self, schedule_id: str, *, limit: int, before_seq: int | None
    ) -> list[Firing]:
        return await self._store.firings(schedule_id, limit=limit, before_seq=before_seq)

    async def _check(self, spec: ScheduleSpec, *, thread_checked: bool = False) -> Cron:
        """Everything a schedule must satisfy before it is stored (InvalidArgument, or
        ThreadNotFound for a caller's thread that does not exist); its parsed cron."""
        violations: list[FieldViolation] = []
        agent = self._executor.agents.get(spec.agent_id)
        if agent is None:
            known = ", ".join(sorted(self._executor.agents)) or "none"
            violations.append(
                FieldViolation(
                    "agent_id", f"unknown agent {spec.agent_id!r}; this server runs: {known}"
                )
            )
        elif agent.validate_input is not None:
            try:
                agent.validate_input(spec.input)
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        cron: Cron | None = None
        try:
            cron = Cron.parse(spec.cron, spec.timezone)
        except CronError as exc:
            violations.append(FieldViolation(exc.field, str(exc)))
        if spec.goal is not None:
            try:
                judge_of(self._executor.agents, spec.goal)
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        threaded = spec.thread_mode is ThreadMode.THREADED
        if threaded and spec.overlap is Overlap.ALLOW:
            violations.append(
                FieldViolation(
                    "overlap_policy",
                    "ALLOW needs a THREADLESS schedule: a thread runs one run at a time "
                    "(use SKIP or ENQUEUE)",
                )
            )
        if not threaded and spec.overlap is Overlap.ENQUEUE:
            violations.append(
                FieldViolation(
                    "overlap_policy",
                    "ENQUEUE needs a THREADED schedule: it queues firings on the schedule's "
                    "thread, and a THREADLESS firing's fresh thread has no queue "
                    "(use SKIP or ALLOW)",
                )
            )
        if spec.thread_id and not threaded:
            violations.append(FieldViolation("thread_id", "is only for a THREADED schedule"))
        if violations:
            raise InvalidArgument(*violations)
        if spec.thread_id and not thread_checked:
            await self._log.get_thread(spec.thread_id)  # ThreadNotFound
        assert cron is not None
        return cron


# ScheduleSpec fields by update_mask path.
_SPEC_FIELDS = {
    "agent_id": "agent_id",
    "cron": "cron",
    "timezone": "timezone",
    "input": "input",
    "overlap_policy": "overlap",
    "catch_up_window": "catch_up_window_ms",
    "paused": "paused",
    "goal": "goal",
}


def _spec(record: ScheduleRecord) -> ScheduleSpec:
    return ScheduleSpec(
        agent_id=record.agent_id,
        cron=record.cron,
        timezone=record.timezone,
        input=record.input,
        thread_mode=record.thread_mode,
        overlap=record.overlap,
        catch_up_window_ms=record.catch_up_window_ms,
        paused=record.paused,
        goal=Goal.decode(record.goal),
        thread_id=record.thread_id,
    )


def _digest(spec: ScheduleSpec, schedule_id: str) -> str:
    """What identifies a CreateSchedule request, so a retry can be told from another request."""
    body = dataclasses.asdict(spec)
    body["goal"] = None if spec.goal is None else spec.goal.encode()
    body["schedule_id"] = schedule_id
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def next_fire_times(record: ScheduleRecord) -> tuple[int, ...]:
    """The schedule's next ticks (none while paused)."""
    if record.paused:
        return ()
    cron = Cron.parse(record.cron, record.timezone)
    return (record.next_tick_ms, *cron.after(record.next_tick_ms, NEXT_FIRE_TIMES - 1))
