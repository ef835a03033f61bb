"""Errors of the HTTP port's own routes as HTTP statuses with Connect's JSON error body.

Connect calls answer errors themselves (connectrpc). The other routes (SSE,
the console, unknown paths) answer with the same shape, so one parser reads
every error of the port: {"code": "not_found", "message": "...",
"details": [{"type": "google.rpc.ErrorInfo", "value": "<base64>",
"debug": {...}}]}, with the HTTP status Connect gives the code.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from google.protobuf import descriptor_pool, json_format, message_factory
from google.rpc import code_pb2, error_details_pb2, status_pb2

from server.api import status

# Connect's HTTP status of each code (connectrpc.com/docs/protocol, "Error Codes").
_HTTP_STATUS = {
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
    code_pb2.UNAUTHENTICATED: 401,
}


@dataclass(frozen=True)
class Problem:
    """An error response: the google.rpc.Status a gRPC client would get, and its HTTP status
    (`http_status` overrides Connect's for the port's own errors: 404, 405, 415)."""

    rpc: status_pb2.Status
    http_status: int
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": status.connect_code(self.rpc.code).value,
            "message": self.rpc.message,
        }
        details = [_detail(any_) for any_ in self.rpc.details]
        if details:
            body["details"] = details
        return body


def problem(exc: BaseException) -> Problem:
    """A domain error (or a bug: INTERNAL) as a Problem, with the status gRPC would give it."""
    rpc = status.to_status(exc)
    return Problem(rpc, _HTTP_STATUS.get(rpc.code, 500))


def http_problem(http_status: HTTPStatus, code: int, message: str, reason: str) -> Problem:
    """An error of the port itself (no such route, a method the route does not take)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=status.DOMAIN)
    rpc = status_pb2.Status(code=code, message=message)
    rpc.details.add().Pack(info)
    return Problem(rpc, http_status)


_QUOTED_CHARS = 200  # of a path or method an error quotes (a path may be as long as a request)


def _quoted(text: str) -> str:
    if len(text) <= _QUOTED_CHARS:
        return repr(text)
    return repr(text[:_QUOTED_CHARS]) + "..."


def not_found(path: str) -> Problem:
    """No route of the port has this path."""
    return http_problem(
        HTTPStatus.NOT_FOUND,
        code_pb2.NOT_FOUND,
        f"no route {_quoted(path)} on this port",
        "NOT_FOUND",
    )


def not_allowed(method: str, path: str, allow: str) -> tuple[Problem, list[tuple[bytes, bytes]]]:
    """The route takes other methods: the Problem and its Allow header."""
    problem = http_problem(
        HTTPStatus.METHOD_NOT_ALLOWED,
        code_pb2.UNIMPLEMENTED,
        f"{_quoted(path)} does not take {_quoted(method)} (allowed: {allow})",
        "METHOD_NOT_ALLOWED",
    )
    return problem, [(b"allow", allow.encode())]


def _detail(any_: Any) -> dict[str, Any]:
    type_name = any_.type_url.rpartition("/")[2]
    detail: dict[str, Any] = {
        "type": type_name,
        "value": base64.b64encode(any_.value).decode().rstrip("="),  # Connect: unpadded
    }
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        return detail
    message = message_factory.GetMessageClass(descriptor)()
    any_.Unpack(message)
    detail["debug"] = json_format.MessageToDict(message)
    return detail
