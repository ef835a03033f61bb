"""A schedule as the store keeps it, and what each of its ticks did.

The record is one JSON document; every write of it is a compare-and-set on
its `version` (ScheduleStore.put), which is how servers that race on a tick,
and requests that change the schedule, never overwrite each other.

Firing a tick happens in two writes (server/schedules/ticker.py): the
server that wins the first stores its decision as the record's `pending`
firing (which tick fires, or why not, and the ids of its run and thread),
then carries it out (starting the run is idempotent: its ids derive from the
schedule and the tick), and the second write records the firings and moves
the schedule on to its next tick. A server that dies between the two leaves
`pending` behind, and whichever server looks next carries out the same
decision.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.ids import derived_id

# Firings kept per schedule (ListScheduleRuns), and missed ticks recorded per catch-up.
FIRINGS_KEPT = 100
MISSED_RECORDED = 20
DEFAULT_CATCH_UP_WINDOW_MS = 365 * 24 * 3600 * 1000
MIN_CATCH_UP_WINDOW_MS = 1000
MAX_CATCH_UP_WINDOW_MS = 366 * 24 * 3600 * 1000

_NAMESPACE = uuid.UUID("9d1c4e2a-7b3f-4a6d-8e5c-2f1b0a9c8d7e")


class ThreadMode(enum.StrEnum):
    """Where a schedule's runs are made."""

    THREADLESS = "threadless"  # each firing on a fresh thread of its own
    THREADED = "threaded"  # every firing on the schedule's one thread


class Overlap(enum.StrEnum):
    """What a tick does while the previous firing's run is active."""

    SKIP = "skip"
    ENQUEUE = "enqueue"  # THREADED only: the run waits in the thread's queue
    ALLOW = "allow"  # THREADLESS only: the run starts beside the active one


class Outcome(enum.StrEnum):
    """What became of a tick (or a trigger)."""

    STARTED = "started"
    SKIPPED = "skipped"
    MISSED = "missed"
    TRIGGERED = "triggered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Firing:
    """One tick's (or trigger's) outcome, as the schedule's history keeps it."""

    seq: int  # its place in the schedule's history: newer firings have larger numbers
    tick_ms: int
    outcome: Outcome
    fire_time_ms: int
    run_id: str = ""
    detail: str = ""

    def encode(self) -> str:
        return json.dumps(
            {
                "seq": self.seq,
                "tick_ms": self.tick_ms,
                "outcome": self.outcome.value,
                "fire_time_ms": self.fire_time_ms,
                "run_id": self.run_id,
                "detail": self.detail,
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str | bytes) -> Firing:
        body = json.loads(text)
        return cls(
            seq=int(body["seq"]),
            tick_ms=int(body["tick_ms"]),
            outcome=Outcome(body["outcome"]),
            fire_time_ms=int(body["fire_time_ms"]),
            run_id=str(body["run_id"]),
            detail=str(body["detail"]),
        )


@dataclass(frozen=True, slots=True)
class Pending:
    """A decided firing, being carried out (see the module docstring)."""

    from_tick_ms: int  # the schedule's next_tick_ms the decision was made at
    next_tick_ms: int  # where the schedule goes on once it is carried out
    decided_ms: int
    tick_ms: int = 0  # the tick that fires (or is skipped); 0 if every tick was missed
    outcome: Outcome = Outcome.MISSED  # STARTED or SKIPPED for tick_ms
    run_id: str = ""  # STARTED: the run to start (its id derives from the tick)
    thread_id: str = ""  # STARTED: the thread it runs on
    request_id: str = ""  # STARTED: the run's request_id (what makes starting idempotent)
    detail: str = ""  # SKIPPED: the active run it found
    missed: tuple[int, ...] = ()  # ticks recorded as MISSED, newest first

    def as_json(self) -> dict[str, Any]:
        return {
            "from_tick_ms": self.from_tick_ms,
            "next_tick_ms": self.next_tick_ms,
            "decided_ms": self.decided_ms,
            "tick_ms": self.tick_ms,
            "outcome": self.outcome.value,
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "request_id": self.request_id,
            "detail": self.detail,
            "missed": list(self.missed),
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Pending:
        return cls(
            from_tick_ms=int(body["from_tick_ms"]),
            next_tick_ms=int(body["next_tick_ms"]),
            decided_ms=int(body["decided_ms"]),
            tick_ms=int(body["tick_ms"]),
            outcome=Outcome(body["outcome"]),
            run_id=str(body["run_id"]),
            thread_id=str(body["thread_id"]),
            request_id=str(body["request_id"]),
            detail=str(body["detail"]),
            missed=tuple(int(t) for t in body["missed"]),
        )


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """A schedule as the store keeps it."""

    schedule_id: str
    agent_id: str
    cron: str
    timezone: str
    input: str
    thread_mode: ThreadMode
    overlap: Overlap
    catch_up_window_ms: int
    paused: bool
    request_id: str
    thread_id: str  # THREADED: the thread every firing runs on; "" for THREADLESS
    goal: str  # every firing's goal (server/goals, JSON), or ""
    create_time_ms: int
    update_time_ms: int
    version: int = 0  # bumped by every write: the compare-and-set token
    next_tick_ms: int = 0  # the next tick to fire; 0 while paused
    pending: Pending | None = None
    last_run_id: str = ""  # the run of the latest firing that started one
    firing_seq: int = 0  # the seq of the latest firing recorded
    owner: str = ""  # the tenant that owns the schedule ("" without authentication)
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer Keel, kept as is

    @property
    def due_ms(self) -> int | None:
        """When a server should look at the schedule next; None: never (paused)."""
        if self.pending is not None:
            return self.pending.decided_ms
        return None if self.paused else self.next_tick_ms

    def encode(self) -> str:
        body = {
            **self.extra,
            "schedule_id": self.schedule_id,
            "agent_id": self.agent_id,
            "cron": self.cron,
            "timezone": self.timezone,
            "input": self.input,
            "thread_mode": self.thread_mode.value,
            "overlap": self.overlap.value,
            "catch_up_window_ms": self.catch_up_window_ms,
            "paused": self.paused,
            "request_id": self.request_id,
            "thread_id": self.thread_id,
            "goal": self.goal,
            "create_time_ms": self.create_time_ms,
            "update_time_ms": self.update_time_ms,
            "version": self.version,
            "next_tick_ms": self.next_tick_ms,
            "pending": None if self.pending is None else self.pending.as_json(),
            "last_run_id": self.last_run_id,
            "firing_seq": self.firing_seq,
            "owner": self.owner,
        }
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes) -> ScheduleRecord:
        body: dict[str, Any] = json.loads(text)
        known = {name for name in cls.__dataclass_fields__ if name != "extra"}
        pending = body.get("pending")
        return cls(
            schedule_id=str(body["schedule_id"]),
            agent_id=str(body["agent_id"]),
            cron=str(body["cron"]),
            timezone=str(body["timezone"]),
            input=str(body["input"]),
            thread_mode=ThreadMode(body["thread_mode"]),
            overlap=Overlap(body["overlap"]),
            catch_up_window_ms=int(body["catch_up_window_ms"]),
            paused=bool(body["paused"]),
            request_id=str(body["request_id"]),
            thread_id=str(body["thread_id"]),
            goal=str(body["goal"]),
            create_time_ms=int(body["create_time_ms"]),
            update_time_ms=int(body["update_time_ms"]),
            version=int(body["version"]),
            next_tick_ms=int(body["next_tick_ms"]),
            pending=None if pending is None else Pending.from_json(pending),
            last_run_id=str(body["last_run_id"]),
            firing_seq=int(body["firing_seq"]),
            owner=str(body.get("owner", "")),
            extra={k: v for k, v in body.items() if k not in known},
        )


@dataclass(frozen=True, slots=True)
class SchedulePageCursor:
    """Where a page of list_schedules ends: ordered by (create_time_ms, schedule_id), newest
    first."""

    create_time_ms: int
    schedule_id: str


def schedule_id_for(request_id: str, tenant: str = "") -> str:
    """The id of a schedule the caller did not name: from request_id (and its tenant) if
    given, else random."""
    if request_id:
        return derived_id(_NAMESPACE, f"request:{request_id}", tenant)
    return uuid.uuid4().hex


def own_thread_id(schedule_id: str) -> str:
    """The thread a THREADED schedule makes for itself (on its first firing)."""
    return uuid.uuid5(_NAMESPACE, f"thread:{schedule_id}").hex


def firing_ids(schedule_id: str, key: str) -> tuple[str, str]:
    """The request_id and fresh thread id of a THREADLESS firing (`key`: its tick, or its
    trigger's request): the same for every server that fires it."""
    return f"schedule:{schedule_id}:{key}", uuid.uuid5(_NAMESPACE, f"{schedule_id}@{key}").hex
