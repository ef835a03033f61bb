"""Request validation at the edge: each malformed field becomes InvalidArgument, with a reason."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import pydantic_core
from keel.v1 import agent_service_pb2 as pb

from server.errors import FieldViolation, InvalidArgument
from server.events.log import BusyPolicy, RunPageCursor, RunState, ThreadPageCursor
from server.goals.records import DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPTS, MAX_OBJECTIVE_BYTES, Goal
from server.runs.decisions import Decision
from server.tasks.records import TaskPageCursor, TaskStatus, run_id_of

MAX_ID_CHARS = 128
MAX_THREAD_ID_CHARS = 64
MAX_INPUT_BYTES = 1 << 20
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 1024
MAX_TOKEN_POSITION = 2**62

# Run ids go inside Redis hash tags ({run_id}) and URLs: no braces, no spaces, nothing exotic.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
# A thread id is the hash tag of its runs' keys and the part of their ids before ":".
_THREAD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A resource id names a Redis key of its own: anything printable but braces and whitespace.
_RESOURCE_ID = re.compile(r"[^\s{}\x00-\x1f\x7f]+")

POLICY_FROM_PROTO: dict[int, BusyPolicy] = {
    pb.THREAD_BUSY_POLICY_UNSPECIFIED: BusyPolicy.REJECT,
    pb.THREAD_BUSY_POLICY_REJECT: BusyPolicy.REJECT,
    pb.THREAD_BUSY_POLICY_ENQUEUE: BusyPolicy.ENQUEUE,
    pb.THREAD_BUSY_POLICY_INTERRUPT: BusyPolicy.INTERRUPT,
    pb.THREAD_BUSY_POLICY_ROLLBACK: BusyPolicy.ROLLBACK,
}

# QUEUED covers the runs that wait for their thread, too (RunState.ENQUEUED).
STATE_FROM_PROTO: dict[int, RunState] = {
    pb.RUN_STATE_QUEUED: RunState.QUEUED,
    pb.RUN_STATE_RUNNING: RunState.RUNNING,
    pb.RUN_STATE_SUSPENDED: RunState.SUSPENDED,
    pb.RUN_STATE_SUCCEEDED: RunState.SUCCEEDED,
    pb.RUN_STATE_FAILED: RunState.FAILED,
    pb.RUN_STATE_CANCELLED: RunState.CANCELLED,
}


def run_id(value: str, field: str = "run_id") -> str:
    """A well-formed run id, or InvalidArgument saying what is wrong with it."""
    if not value:
        raise InvalidArgument(FieldViolation(field, "is required"))
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(
            FieldViolation(field, f"is {len(value)} characters long; the limit is {MAX_ID_CHARS}")
        )
    if not _ID.fullmatch(value):
        raise InvalidArgument(
            FieldViolation(
                field,
                "may hold only letters, digits and _ . : - and must start with a letter or digit",
            )
        )
    return value


def thread_id(value: str, field: str = "thread_id") -> str:
    """A well-formed thread id, or InvalidArgument saying what is wrong with it."""
    if not value:
        raise InvalidArgument(FieldViolation(field, "is required"))
    if len(value) > MAX_THREAD_ID_CHARS:
        raise InvalidArgument(
            FieldViolation(
                field, f"is {len(value)} characters long; the limit is {MAX_THREAD_ID_CHARS}"
            )
        )
    if not _THREAD_ID.fullmatch(value):
        raise InvalidArgument(
            FieldViolation(
                field,
                "may hold only letters, digits and _ . - and must start with a letter or digit",
            )
        )
    return value


def resource_id(value: str) -> str:
    """An empty or well-formed resource id, or InvalidArgument."""
    if value and len(value) > MAX_ID_CHARS:
        raise InvalidArgument(
            FieldViolation(
                "resource_id", f"is {len(value)} characters long; the limit is {MAX_ID_CHARS}"
            )
        )
    if value and not _RESOURCE_ID.fullmatch(value):
        raise InvalidArgument(
            FieldViolation("resource_id", "must not hold whitespace, braces or control characters")
        )
    return value


def metadata(values: Mapping[str, str]) -> dict[str, str]:
    """Thread metadata within its limits, or InvalidArgument naming each bad entry."""
    violations: list[FieldViolation] = []
    if len(values) > MAX_METADATA_ENTRIES:
        violations.append(
            FieldViolation(
                "metadata", f"has {len(values)} entries; the limit is {MAX_METADATA_ENTRIES}"
            )
        )
    for key, value in sorted(values.items()):
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            violations.append(
                FieldViolation(
                    "metadata",
                    f"key {key[:32]!r}: must be 1 to {MAX_METADATA_KEY_CHARS} characters long",
                )
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            violations.append(
                FieldViolation(
                    f"metadata[{key[:32]!r}]",
                    f"is {len(value)} characters long; the limit is {MAX_METADATA_VALUE_CHARS}",
                )
            )
    if violations:
        raise InvalidArgument(*violations[:5])
    return dict(values)


def policy(value: int) -> BusyPolicy:
    result = POLICY_FROM_PROTO.get(value)
    if result is None:
        raise InvalidArgument(
            FieldViolation("busy_policy", f"{value} is not a valid ThreadBusyPolicy")
        )
    return result


def offset(value: int) -> int:
    if value < 0:
        raise InvalidArgument(FieldViolation("offset", f"must not be negative (got {value})"))
    return value


MAX_INCARNATION_CHARS = 64  # a redis-server's run_id has 40


def incarnation(value: str) -> str:
    """An incarnation as a stream told it (Run.incarnation, Heartbeat.incarnation)."""
    if value and (len(value) > MAX_INCARNATION_CHARS or not value.isascii() or not value.isalnum()):
        raise InvalidArgument(
            FieldViolation(
                "incarnation",
                "must be an incarnation a stream of this run sent (letters and digits, "
                f"at most {MAX_INCARNATION_CHARS})",
            )
        )
    return value


def start(
    agent_id: str, input: str, request_id: str, thread: str = "", busy_policy: int = 0
) -> BusyPolicy:
    """Checks the fields shared by Stream and StartRun; returns the busy policy."""
    violations: list[FieldViolation] = []
    if not agent_id:
        violations.append(FieldViolation("agent_id", "is required"))
    elif len(agent_id) > MAX_ID_CHARS:
        violations.append(FieldViolation("agent_id", f"is longer than {MAX_ID_CHARS} characters"))
    size = len(input.encode())
    if size > MAX_INPUT_BYTES:
        violations.append(
            FieldViolation("input", f"is {size} bytes long; the limit is {MAX_INPUT_BYTES}")
        )
    if request_id:
        violations.extend(_violations(run_id, request_id, "request_id"))
    if thread:
        violations.extend(_violations(thread_id, thread))
    violations.extend(_violations(policy, busy_policy))
    if violations:
        raise InvalidArgument(*violations)
    return policy(busy_policy)


def goal(message: pb.Goal, field: str = "goal") -> Goal:
    """A goal within its limits, or InvalidArgument naming each bad field.

    Whether its judge is an agent that judges is the executor's to check.
    """
    violations: list[FieldViolation] = []
    size = len(message.objective.encode())
    if not message.objective.strip():
        violations.append(FieldViolation(f"{field}.objective", "is required"))
    elif size > MAX_OBJECTIVE_BYTES:
        violations.append(
            FieldViolation(
                f"{field}.objective", f"is {size} bytes long; the limit is {MAX_OBJECTIVE_BYTES}"
            )
        )
    if not message.judge_agent_id:
        violations.append(FieldViolation(f"{field}.judge_agent_id", "is required"))
    max_attempts = message.max_attempts or DEFAULT_MAX_ATTEMPTS
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        violations.append(
            FieldViolation(
                f"{field}.max_attempts",
                f"must be from 1 to {MAX_ATTEMPTS} (0 means {DEFAULT_MAX_ATTEMPTS}), "
                f"got {message.max_attempts}",
            )
        )
    if violations:
        raise InvalidArgument(*violations)
    return Goal(message.objective, message.judge_agent_id, max_attempts)


def _violations(check: Callable[..., object], *args: Any) -> Sequence[FieldViolation]:
    """What `check(*args)` finds wrong (it raises InvalidArgument), or nothing."""
    try:
        check(*args)
    except InvalidArgument as exc:
        return exc.violations
    return ()


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument(FieldViolation("page_size", f"must not be negative (got {value})"))
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def states(values: Iterable[int]) -> frozenset[RunState]:
    result: set[RunState] = set()
    for value in values:
        state = STATE_FROM_PROTO.get(value)
        if state is None:
            raise InvalidArgument(FieldViolation("states", f"{value} is not a valid RunState"))
        result.add(state)
        if state is RunState.QUEUED:
            result.add(RunState.ENQUEUED)
    return frozenset(result)


# Page tokens: base64 of JSON holding where the page ends and a digest of the
# request's filters, so a token is only valid with the filters that made it.


def _digest(*filters: Any) -> str:
    return hashlib.sha256(json.dumps(filters).encode()).hexdigest()[:16]


def _run_filters(
    agent_id: str, states: frozenset[RunState], thread: str, schedule: str = ""
) -> str:
    # Without a thread (or schedule) the digest is the one tokens had before they existed.
    by_state = sorted({s.value for s in states} - {RunState.ENQUEUED.value})
    optional = [*([thread] if thread else []), *([f"schedule:{schedule}"] if schedule else [])]
    return _digest(agent_id, by_state, *optional)


def _encode_token(body: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


def _decode_token(token: str, digest: str) -> dict[str, Any]:
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode()))
        issued_for = body["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeError, RecursionError):
        raise InvalidArgument(
            FieldViolation("page_token", "is not a token this server issued")
        ) from None
    if issued_for != digest:
        raise InvalidArgument(
            FieldViolation("page_token", "was issued for other filters; send the same filters")
        )
    return cast(dict[str, Any], body)


def _bad_token() -> InvalidArgument:
    return InvalidArgument(FieldViolation("page_token", "is not a token this server issued"))


def encode_token(body: dict[str, Any], *filters: Any) -> str:
    """An opaque page token holding `body`, bound to the request's `filters`."""
    return _encode_token({**body, "f": _digest(*filters)})


def decode_token(token: str, *filters: Any) -> dict[str, Any]:
    """The body of a token encode_token made for the same `filters`, or InvalidArgument."""
    return _decode_token(token, _digest(*filters))


bad_token = _bad_token


def task_id(value: str) -> str:
    """A well-formed task id (its run's id, ".", 16 hex digits), or InvalidArgument."""
    run_id(value, "task_id")
    if not run_id_of(value):
        raise InvalidArgument(FieldViolation("task_id", "is not a task id"))
    return value


# Which statuses ListTasks filters on; RUNNING and STARTED both mean running.
TASK_STATUS_FROM_PROTO: dict[int, TaskStatus] = {
    pb.TASK_STATUS_QUEUED: TaskStatus.QUEUED,
    pb.TASK_STATUS_STARTED: TaskStatus.RUNNING,
    pb.TASK_STATUS_RUNNING: TaskStatus.RUNNING,
    pb.TASK_STATUS_RETRYING: TaskStatus.RETRYING,
    pb.TASK_STATUS_COMPLETED: TaskStatus.COMPLETED,
    pb.TASK_STATUS_FAILED: TaskStatus.FAILED,
    pb.TASK_STATUS_CANCELLED: TaskStatus.CANCELLED,
}


def task_statuses(values: Iterable[int]) -> frozenset[TaskStatus]:
    result: set[TaskStatus] = set()
    for value in values:
        status = TASK_STATUS_FROM_PROTO.get(value)
        if status is None:
            raise InvalidArgument(
                FieldViolation("statuses", f"{value} is not a status a task can be in")
            )
        result.add(status)
    return frozenset(result)


def _task_filters(run: str, agent: str, statuses: frozenset[TaskStatus]) -> str:
    return _digest("tasks", run, agent, sorted(s.value for s in statuses))


def encode_task_page_token(
    cursor: TaskPageCursor, run: str, agent: str, statuses: frozenset[TaskStatus]
) -> str:
    digest = _task_filters(run, agent, statuses)
    return _encode_token({"t": cursor.create_time_ms, "r": cursor.task_id, "f": digest})


def decode_task_page_token(
    token: str, run: str, agent: str, statuses: frozenset[TaskStatus]
) -> TaskPageCursor | None:
    if not token:
        return None
    body = _decode_token(token, _task_filters(run, agent, statuses))
    try:
        return TaskPageCursor(create_time_ms=int(body["t"]), task_id=task_id(str(body["r"])))
    except (ValueError, OverflowError, KeyError, TypeError, InvalidArgument):
        raise _bad_token() from None


def encode_page_token(
    cursor: RunPageCursor,
    agent_id: str,
    states: frozenset[RunState],
    thread: str = "",
    schedule: str = "",
) -> str:
    """An opaque token for the page after `cursor`, bound to the filters that produced it."""
    digest = _run_filters(agent_id, states, thread, schedule)
    return _encode_token({"t": cursor.create_time_ms, "r": cursor.run_id, "f": digest})


def decode_page_token(
    token: str,
    agent_id: str,
    states: frozenset[RunState],
    thread: str = "",
    schedule: str = "",
) -> RunPageCursor | None:
    """The cursor in `token` ("" for the first page), or InvalidArgument."""
    if not token:
        return None
    body = _decode_token(token, _run_filters(agent_id, states, thread, schedule))
    try:
        return RunPageCursor(create_time_ms=int(body["t"]), run_id=run_id(str(body["r"])))
    except (ValueError, OverflowError, KeyError, TypeError, InvalidArgument):
        raise _bad_token() from None


def encode_thread_page_token(cursor: ThreadPageCursor, resource: str) -> str:
    digest = _digest("threads", resource)
    return _encode_token({"t": cursor.create_time_ms, "r": cursor.thread_id, "f": digest})


def decode_thread_page_token(token: str, resource: str) -> ThreadPageCursor | None:
    if not token:
        return None
    body = _decode_token(token, _digest("threads", resource))
    try:
        return ThreadPageCursor(create_time_ms=int(body["t"]), thread_id=thread_id(str(body["r"])))
    except (ValueError, OverflowError, KeyError, TypeError, InvalidArgument):
        raise _bad_token() from None


def encode_message_page_token(position: int, thread: str, newest_first: bool) -> str:
    return _encode_token({"i": position, "f": _digest("messages", thread, newest_first)})


def decode_message_page_token(token: str, thread: str, newest_first: bool) -> int | None:
    """The position a page of a thread's messages starts at (None: the first page)."""
    if not token:
        return None
    return token_position(_decode_token(token, _digest("messages", thread, newest_first)), "i")


def token_position(body: dict[str, Any], key: str) -> int:
    """A position or sequence number of a token's body, or InvalidArgument. The store
    takes it as a 64-bit integer, a page after it included: a larger one is no token
    this server issued."""
    value = body.get(key)
    if type(value) is not int or not 0 <= value <= MAX_TOKEN_POSITION:
        raise _bad_token()
    return value


def decisions(items: Sequence[pb.Decision]) -> list[Decision]:
    """Resume's decisions as domain Decisions, or InvalidArgument naming each bad one."""
    violations: list[FieldViolation] = []
    result: list[Decision] = []
    seen: set[str] = set()
    if not items:
        violations.append(FieldViolation("decisions", "at least one decision is required"))
    for n, item in enumerate(items):
        where = f"decisions[{n}]"
        if not item.tool_call_id:
            violations.append(FieldViolation(f"{where}.tool_call_id", "is required"))
            continue
        if item.tool_call_id in seen:
            violations.append(
                FieldViolation(f"{where}.tool_call_id", f"{item.tool_call_id!r} is answered twice")
            )
            continue
        seen.add(item.tool_call_id)
        try:
            result.append(_decision(where, item))
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    if violations:
        raise InvalidArgument(*violations)
    return result


def _decision(where: str, item: pb.Decision) -> Decision:
    match item.WhichOneof("decision"):
        case "approve":
            override = None
            if item.approve.override_args_json:
                override = _json(
                    f"{where}.approve.override_args_json", item.approve.override_args_json
                )
                if not isinstance(override, dict):
                    raise InvalidArgument(
                        FieldViolation(
                            f"{where}.approve.override_args_json", "must be a JSON object"
                        )
                    )
            return Decision(item.tool_call_id, "approve", override_args=override)
        case "deny":
            return Decision(item.tool_call_id, "deny", message=item.deny.message)
        case "result_json":
            return Decision(
                item.tool_call_id, "result", result=_json(f"{where}.result_json", item.result_json)
            )
        case _:
            raise InvalidArgument(
                FieldViolation(where, "needs one of approve, deny or result_json")
            )


def _json(field: str, text: str) -> Any:
    if len(text.encode()) > MAX_INPUT_BYTES:
        raise InvalidArgument(FieldViolation(field, f"is longer than {MAX_INPUT_BYTES} bytes"))
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(FieldViolation(field, f"is not valid JSON: {exc}")) from None
    except RecursionError:
        raise InvalidArgument(FieldViolation(field, "is JSON nested too deeply")) from None
    try:
        pydantic_core.to_json(value)  # as the run's history will hold it
    except pydantic_core.PydanticSerializationError as exc:  # a lone surrogate, too deep
        raise InvalidArgument(FieldViolation(field, f"cannot be stored: {exc}")) from None
    return value
