"""The one place that turns Keel's domain errors into gRPC status (google.rpc rich errors),
and the same status into Connect's errors for the HTTP port.

Every error carries an ErrorInfo with domain "keel.dev", an UPPER_SNAKE reason and
metadata holding each dynamic value, so clients branch on data, not on prose.
"""

from __future__ import annotations

import logging

from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError, ErrorDetail
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from protobuf import wkt

from server import errors

DOMAIN = "keel.dev"
_RETRY_DELAY_S = 1
# A status goes out in trailers, its message twice (grpc-message, percent-encoded, and in
# grpc-status-details-bin, base64); clients drop trailers past 8 to 16 KB, and the error
# with them. Messages may quote the request (a cron expression, an agent's input check):
# the message, and a BadRequest's fields and descriptions together, stay within these.
_MAX_MESSAGE_BYTES = 1000
_MAX_VIOLATIONS_BYTES = 2000

log = logging.getLogger(__name__)


def to_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status a client should see for `exc`."""
    match exc:
        case errors.UnknownAgent():
            return _status(
                code_pb2.INVALID_ARGUMENT,
                exc,
                "UNKNOWN_AGENT",
                {"agent_id": exc.agent_id},
                _bad_request(exc),
            )
        case errors.InvalidArgument():
            return _status(
                code_pb2.INVALID_ARGUMENT, exc, "INVALID_ARGUMENT", {}, _bad_request(exc)
            )
        case errors.RunNotFound():
            return _status(code_pb2.NOT_FOUND, exc, "RUN_NOT_FOUND", {"run_id": exc.run_id})
        case errors.RequestIdReused():
            made = (
                {"schedule_id": exc.schedule_id}
                if exc.schedule_id
                else {"thread_id": exc.thread_id}
                if exc.thread_id
                else {"run_id": exc.run_id}
            )
            return _status(
                code_pb2.ALREADY_EXISTS,
                exc,
                "REQUEST_ID_REUSED",
                {"request_id": exc.request_id, **made},
            )
        case errors.ThreadNotFound():
            return _status(
                code_pb2.NOT_FOUND, exc, "THREAD_NOT_FOUND", {"thread_id": exc.thread_id}
            )
        case errors.ThreadAlreadyExists():
            return _status(
                code_pb2.ALREADY_EXISTS, exc, "THREAD_ALREADY_EXISTS", {"thread_id": exc.thread_id}
            )
        case errors.ThreadBusy():
            return _status(
                code_pb2.FAILED_PRECONDITION,
                exc,
                "THREAD_BUSY",
                {"thread_id": exc.thread_id, "active_run_id": exc.active_run_id},
            )
        case errors.ScheduleNotFound():
            return _status(
                code_pb2.NOT_FOUND, exc, "SCHEDULE_NOT_FOUND", {"schedule_id": exc.schedule_id}
            )
        case errors.ScheduleAlreadyExists():
            return _status(
                code_pb2.ALREADY_EXISTS,
                exc,
                "SCHEDULE_ALREADY_EXISTS",
                {"schedule_id": exc.schedule_id},
            )
        case errors.ScheduleChanged():
            return _status(
                code_pb2.ABORTED, exc, "CONCURRENT_MODIFICATION", {"schedule_id": exc.schedule_id}
            )
        case errors.TaskNotFound():
            return _status(code_pb2.NOT_FOUND, exc, "TASK_NOT_FOUND", {"task_id": exc.task_id})
        case errors.TaskNotRetryable():
            return _status(
                code_pb2.FAILED_PRECONDITION,
                exc,
                "TASK_NOT_RETRYABLE",
                {"task_id": exc.task_id, "status": exc.status},
            )
        case errors.RunNotResumable():
            return _status(
                code_pb2.FAILED_PRECONDITION,
                exc,
                "RUN_NOT_RESUMABLE",
                {
                    "run_id": exc.run_id,
                    "offset": str(exc.offset),
                    "next_offset": str(exc.next_offset),
                },
            )
        case errors.OffsetExpired():
            return _status(
                code_pb2.OUT_OF_RANGE,
                exc,
                "OFFSET_EXPIRED",
                {
                    "run_id": exc.run_id,
                    "offset": str(exc.offset),
                    "earliest_offset": str(exc.earliest_offset),
                    "next_offset": str(exc.next_offset),
                },
            )
        case errors.LogRolledBack():
            metadata = {
                "run_id": exc.run_id,
                "offset": str(exc.offset),
                "next_offset": str(exc.next_offset),
                "incarnation": exc.incarnation,
            }
            if exc.diverged_at is not None:
                metadata["diverged_at"] = str(exc.diverged_at)
            return _status(code_pb2.FAILED_PRECONDITION, exc, "LOG_ROLLED_BACK", metadata)
        case errors.OffsetBeyondEnd():
            return _status(
                code_pb2.OUT_OF_RANGE,
                exc,
                "OFFSET_BEYOND_END",
                {
                    "run_id": exc.run_id,
                    "offset": str(exc.offset),
                    "next_offset": str(exc.next_offset),
                },
            )
        case errors.RunNotSuspended():
            return _status(
                code_pb2.FAILED_PRECONDITION,
                exc,
                "RUN_NOT_SUSPENDED",
                {"run_id": exc.run_id, "state": exc.state},
            )
        case errors.InterruptResolved():
            return _status(
                code_pb2.FAILED_PRECONDITION,
                exc,
                "INTERRUPT_RESOLVED",
                {"run_id": exc.run_id, "tool_call_id": exc.tool_call_id},
            )
        case errors.ConcurrentModification():
            return _status(code_pb2.ABORTED, exc, "CONCURRENT_MODIFICATION", {"run_id": exc.run_id})
        case errors.StoreUnavailable():
            return _status(code_pb2.UNAVAILABLE, exc, "STORE_UNAVAILABLE", {}, _retry_info())
        case errors.Unauthenticated():
            return _status(code_pb2.UNAUTHENTICATED, exc, "UNAUTHENTICATED", {})
        case errors.PermissionDenied():
            return _status(
                code_pb2.PERMISSION_DENIED,
                exc,
                "PERMISSION_DENIED",
                {"method": exc.method, "role": exc.role, "needed_role": exc.needed},
            )
        case errors.EngineUnavailable():
            return _status(code_pb2.UNAVAILABLE, exc, "ENGINE_UNAVAILABLE", {}, _retry_info())
        case errors.ServerDraining():
            return _status(code_pb2.UNAVAILABLE, exc, "SERVER_DRAINING", {}, _retry_info())
        case _:
            # A bug, or a fenced write that escaped its run: never leak internals to clients.
            log.exception("internal error", exc_info=exc)
            return _status(code_pb2.INTERNAL, RuntimeError("internal error"), "INTERNAL", {})


def to_connect_error(exc: BaseException) -> ConnectError:
    """The same status as to_status, as an error of the Connect protocol (the HTTP port)."""
    rpc = to_status(exc)
    return ConnectError(
        connect_code(rpc.code),
        rpc.message,
        [ErrorDetail(wkt.Any(type_url=d.type_url, value=d.value)) for d in rpc.details],
    )


def connect_code(code: int) -> ConnectCode:
    """Connect's name of a google.rpc code: the same codes, CANCELLED spelled CANCELED."""
    name = code_pb2.Code.Name(code)
    return ConnectCode.CANCELED if name == "CANCELLED" else ConnectCode[name]


def _status(
    code: int,
    exc: BaseException,
    reason: str,
    metadata: dict[str, str],
    *extra: any_pb2.Any,
) -> status_pb2.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    message = _cut(str(exc), _MAX_MESSAGE_BYTES)
    return status_pb2.Status(code=code, message=message, details=[info, *extra])


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` bytes of UTF-8, ending in "..." when it had to be cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: max(0, limit - 3)].decode(errors="ignore") + "..."


def _bad_request(exc: errors.InvalidArgument) -> any_pb2.Any:
    violations = []
    room = _MAX_VIOLATIONS_BYTES
    for v in exc.violations:  # in order, the last one shown cut, the ones after it left out
        if room <= len(v.field.encode()):
            break
        room -= len(v.field.encode())
        description = _cut(v.description, room)
        room -= len(description.encode())
        violations.append(
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=description)
        )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=violations))
    return detail


def _retry_info() -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=_RETRY_DELAY_S))
    )
    return detail
