"""Request validation at the edge: each malformed field becomes InvalidArgument, with a reason."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from keel.v1 import agent_service_pb2 as pb

from server.errors import FieldViolation, InvalidArgument
from server.events.log import RunPageCursor, RunState
from server.runs.decisions import Decision

MAX_ID_CHARS = 128
MAX_INPUT_BYTES = 1 << 20
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# Run ids go inside Redis hash tags ({run_id}) and URLs: no braces, no spaces, nothing exotic.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")

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


def offset(value: int) -> int:
    if value < 0:
        raise InvalidArgument(FieldViolation("offset", f"must not be negative (got {value})"))
    return value


def start(agent_id: str, input: str, request_id: str) -> None:
    """Checks the fields shared by Stream and StartRun."""
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
        try:
            run_id(request_id, "request_id")
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    if violations:
        raise InvalidArgument(*violations)


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
    return frozenset(result)


def _filter_digest(agent_id: str, states: frozenset[RunState]) -> str:
    key = json.dumps([agent_id, sorted(s.value for s in states)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def encode_page_token(cursor: RunPageCursor, agent_id: str, states: frozenset[RunState]) -> str:
    """An opaque token for the page after `cursor`, bound to the filters that produced it."""
    body = json.dumps(
        {"t": cursor.create_time_ms, "r": cursor.run_id, "f": _filter_digest(agent_id, states)}
    )
    return base64.urlsafe_b64encode(body.encode()).decode()


def decode_page_token(
    token: str, agent_id: str, states: frozenset[RunState]
) -> RunPageCursor | None:
    """The cursor in `token` ("" for the first page), or InvalidArgument."""
    if not token:
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode()))
        cursor = RunPageCursor(create_time_ms=int(body["t"]), run_id=run_id(str(body["r"])))
        digest = body["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, InvalidArgument, UnicodeError):
        raise InvalidArgument(
            FieldViolation("page_token", "is not a token this server issued")
        ) from None
    if digest != _filter_digest(agent_id, states):
        raise InvalidArgument(
            FieldViolation("page_token", "was issued for other filters; send the same filters")
        )
    return cursor


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
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(FieldViolation(field, f"is not valid JSON: {exc}")) from None
