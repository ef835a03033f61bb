"""The schedule RPCs' messages: requests checked and read into domain terms, records shown.

Each malformed field of a request becomes a FieldViolation of one
InvalidArgument; what needs the server's state (the agent, the judge, the
thread) is checked by server/schedules/service.py.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from keel.v1 import agent_service_pb2 as pb

from server.api import convert, validate
from server.errors import FieldViolation, InvalidArgument
from server.goals.records import Goal
from server.schedules.records import (
    DEFAULT_CATCH_UP_WINDOW_MS,
    MAX_CATCH_UP_WINDOW_MS,
    MIN_CATCH_UP_WINDOW_MS,
    Firing,
    Outcome,
    Overlap,
    SchedulePageCursor,
    ThreadMode,
)
from server.schedules.service import UPDATABLE, ScheduleSpec, ScheduleView

THREAD_MODE_FROM_PROTO: dict[int, ThreadMode] = {
    pb.SCHEDULE_THREAD_MODE_UNSPECIFIED: ThreadMode.THREADLESS,
    pb.SCHEDULE_THREAD_MODE_THREADLESS: ThreadMode.THREADLESS,
    pb.SCHEDULE_THREAD_MODE_THREADED: ThreadMode.THREADED,
}
THREAD_MODE_TO_PROTO = {
    ThreadMode.THREADLESS: pb.SCHEDULE_THREAD_MODE_THREADLESS,
    ThreadMode.THREADED: pb.SCHEDULE_THREAD_MODE_THREADED,
}
OVERLAP_FROM_PROTO: dict[int, Overlap] = {
    pb.SCHEDULE_OVERLAP_POLICY_UNSPECIFIED: Overlap.SKIP,
    pb.SCHEDULE_OVERLAP_POLICY_SKIP: Overlap.SKIP,
    pb.SCHEDULE_OVERLAP_POLICY_ENQUEUE: Overlap.ENQUEUE,
    pb.SCHEDULE_OVERLAP_POLICY_ALLOW: Overlap.ALLOW,
}
OVERLAP_TO_PROTO = {
    Overlap.SKIP: pb.SCHEDULE_OVERLAP_POLICY_SKIP,
    Overlap.ENQUEUE: pb.SCHEDULE_OVERLAP_POLICY_ENQUEUE,
    Overlap.ALLOW: pb.SCHEDULE_OVERLAP_POLICY_ALLOW,
}
OUTCOME_TO_PROTO = {
    Outcome.STARTED: pb.SCHEDULE_FIRING_OUTCOME_STARTED,
    Outcome.SKIPPED: pb.SCHEDULE_FIRING_OUTCOME_SKIPPED,
    Outcome.MISSED: pb.SCHEDULE_FIRING_OUTCOME_MISSED,
    Outcome.TRIGGERED: pb.SCHEDULE_FIRING_OUTCOME_TRIGGERED,
    Outcome.FAILED: pb.SCHEDULE_FIRING_OUTCOME_FAILED,
}


def schedule_id(value: str, field: str = "schedule_id") -> str:
    """A well-formed schedule id (the same rules as a thread id), or InvalidArgument."""
    return validate.thread_id(value, field)


def create_request(request: pb.CreateScheduleRequest) -> tuple[ScheduleSpec, str, str]:
    """The spec, schedule_id ("" for the server to pick) and request_id of a create."""
    violations: list[FieldViolation] = []
    checks: list[tuple[str, Any]] = [
        ("agent_id", lambda: _agent_id(request.agent_id)),
        ("input", lambda: _input(request.input)),
        ("thread_mode", lambda: _enum(THREAD_MODE_FROM_PROTO, request.thread_mode, "thread_mode")),
        (
            "overlap_policy",
            lambda: _enum(OVERLAP_FROM_PROTO, request.overlap_policy, "overlap_policy"),
        ),
        (
            "catch_up_window",
            lambda: (
                _window(request.catch_up_window)
                if request.HasField("catch_up_window")
                else DEFAULT_CATCH_UP_WINDOW_MS
            ),
        ),
        ("goal", lambda: validate.goal(request.goal) if request.HasField("goal") else None),
        ("schedule_id", lambda: schedule_id(request.schedule_id) if request.schedule_id else ""),
        (
            "request_id",
            lambda: validate.run_id(request.request_id, "request_id") if request.request_id else "",
        ),
        ("thread_id", lambda: validate.thread_id(request.thread_id) if request.thread_id else ""),
    ]
    values: dict[str, Any] = {}
    for name, check in checks:
        try:
            values[name] = check()
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    if violations:
        raise InvalidArgument(*violations)
    spec = ScheduleSpec(
        agent_id=values["agent_id"],
        cron=request.cron,
        timezone=request.timezone,
        input=values["input"],
        thread_mode=values["thread_mode"],
        overlap=values["overlap_policy"],
        catch_up_window_ms=values["catch_up_window"],
        paused=request.paused,
        goal=values["goal"],
        thread_id=values["thread_id"],
    )
    return spec, values["schedule_id"], values["request_id"]


def update_request(request: pb.UpdateScheduleRequest) -> tuple[str, dict[str, Any]]:
    """The schedule to change, and the new values by update_mask path."""
    schedule = request.schedule
    paths = list(request.update_mask.paths)
    violations: list[FieldViolation] = []
    try:
        schedule_id(schedule.schedule_id, "schedule.schedule_id")
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    if not paths:
        violations.append(
            FieldViolation(
                "update_mask", f"names no field; name any of {', '.join(sorted(UPDATABLE))}"
            )
        )
    readers: dict[str, Any] = {
        "agent_id": lambda: _agent_id(schedule.agent_id, "schedule.agent_id"),
        "cron": lambda: schedule.cron,
        "timezone": lambda: schedule.timezone,
        "input": lambda: _input(schedule.input, "schedule.input"),
        "overlap_policy": lambda: _enum(
            OVERLAP_FROM_PROTO, schedule.overlap_policy, "schedule.overlap_policy"
        ),
        "catch_up_window": lambda: (
            _window(schedule.catch_up_window, "schedule.catch_up_window")
            if schedule.HasField("catch_up_window")
            else DEFAULT_CATCH_UP_WINDOW_MS
        ),
        "paused": lambda: schedule.paused,
        "goal": lambda: (
            validate.goal(schedule.goal, "schedule.goal") if schedule.HasField("goal") else None
        ),
    }
    changes: dict[str, Any] = {}
    for path in paths:
        reader = readers.get(path)
        if reader is None:
            violations.append(
                FieldViolation(
                    "update_mask",
                    f"{path!r} cannot be updated; the fields that can: "
                    f"{', '.join(sorted(UPDATABLE))}",
                )
            )
            continue
        try:
            changes[path] = reader()
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    if violations:
        raise InvalidArgument(*violations)
    return schedule.schedule_id, changes


def _agent_id(value: str, field: str = "agent_id") -> str:
    if not value:
        raise InvalidArgument(FieldViolation(field, "is required"))
    if len(value) > validate.MAX_ID_CHARS:
        raise InvalidArgument(
            FieldViolation(field, f"is longer than {validate.MAX_ID_CHARS} characters")
        )
    return value


def _input(value: str, field: str = "input") -> str:
    size = len(value.encode())
    if size > validate.MAX_INPUT_BYTES:
        raise InvalidArgument(
            FieldViolation(field, f"is {size} bytes long; the limit is {validate.MAX_INPUT_BYTES}")
        )
    return value


def _enum(mapping: dict[int, Any], value: int, field: str) -> Any:
    if value not in mapping:
        raise InvalidArgument(FieldViolation(field, f"{value} is not a valid value"))
    return mapping[value]


def _window(value: Duration, field: str = "catch_up_window") -> int:
    ms = value.ToMilliseconds()
    if (
        value.seconds < 0
        or value.nanos < 0
        or not (MIN_CATCH_UP_WINDOW_MS <= ms <= MAX_CATCH_UP_WINDOW_MS)
    ):
        raise InvalidArgument(
            FieldViolation(field, f"must be from 1 second to 366 days, got {ms} ms")
        )
    return ms


# Page tokens.


def encode_page_token(cursor: SchedulePageCursor, agent_id: str) -> str:
    return validate.encode_token(
        {"t": cursor.create_time_ms, "r": cursor.schedule_id}, "schedules", agent_id
    )


def decode_page_token(token: str, agent_id: str) -> SchedulePageCursor | None:
    if not token:
        return None
    body = validate.decode_token(token, "schedules", agent_id)
    try:
        return SchedulePageCursor(int(body["t"]), schedule_id(str(body["r"])))
    except (ValueError, OverflowError, KeyError, TypeError, InvalidArgument):
        raise validate.bad_token() from None


def encode_firing_token(seq: int, schedule: str) -> str:
    return validate.encode_token({"s": seq}, "firings", schedule)


def decode_firing_token(token: str, schedule: str) -> int | None:
    if not token:
        return None
    return validate.token_position(validate.decode_token(token, "firings", schedule), "s")


# Records shown.


def _timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def firing(value: Firing) -> pb.ScheduleFiring:
    return pb.ScheduleFiring(
        tick_time=_timestamp(value.tick_ms),
        outcome=OUTCOME_TO_PROTO[value.outcome],
        run_id=value.run_id,
        fire_time=_timestamp(value.fire_time_ms),
        detail=value.detail,
    )


def schedule(view: ScheduleView) -> pb.Schedule:
    record = view.record
    window = Duration()
    window.FromMilliseconds(record.catch_up_window_ms)
    message = pb.Schedule(
        schedule_id=record.schedule_id,
        agent_id=record.agent_id,
        cron=record.cron,
        timezone=record.timezone,
        input=record.input,
        thread_mode=THREAD_MODE_TO_PROTO[record.thread_mode],
        overlap_policy=OVERLAP_TO_PROTO[record.overlap],
        catch_up_window=window,
        paused=record.paused,
        request_id=record.request_id,
        thread_id=record.thread_id,
        create_time=_timestamp(record.create_time_ms),
        update_time=_timestamp(record.update_time_ms),
        next_fire_times=[_timestamp(ms) for ms in view.next_fire_times_ms],
        recent_firings=[firing(f) for f in view.recent_firings],
        last_run_id=record.last_run_id,
    )
    goal = Goal.decode(record.goal)
    if goal is not None:
        message.goal.CopyFrom(convert.goal_message(goal))
    return message
