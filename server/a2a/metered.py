"""A2A calls in the RPC metrics (keel_rpc_duration_seconds, keel_streams_open; server/metrics.py).

Every binding (JSON-RPC and HTTP+JSON on the HTTP port, A2AService on the
gRPC port) calls the one RequestHandler, so `MeteredRequestHandler`, which
wraps it, counts each operation the handler runs whatever the binding: the
method label is the A2A operation ("a2a.SendStreamingMessage", ...; the
fixed set OPERATIONS), the code label the gRPC code name the call ends with
(an A2A error by the A2A spec's table, `A2A_ERROR_MAPPING`: TaskNotFound is
NOT_FOUND, TaskNotCancelable FAILED_PRECONDITION; a client gone: CANCELLED),
and streams (SendStreamingMessage, SubscribeToTask) count in
keel_streams_open while open.

The HTTP port's calls that the SDK answers before the handler (an unknown
JSON-RPC method, params that do not parse, a missing `A2A-Version: 1.0`)
are counted by `serve` from the response: the method named if it is an A2A
operation, else "a2a.unknown", so clients cannot grow the label set. Calls
the gate refuses (401, 403) or that are too big (413) are not counted, as
AgentService calls refused before their handler are not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeVar

from a2a.server.context import ServerCallContext
from a2a.server.events import Event
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import A2A_ERROR_MAPPING, JSON_RPC_ERROR_CODE_MAP, A2AError
from google.rpc import code_pb2

from server import metrics
from server.api import status
from server.web.asgi import Message, Receive, Scope, Send

PREFIX = "a2a."
UNKNOWN = PREFIX + "unknown"  # any method or route that is not an A2A operation
# The A2A operations (A2AService's methods, JSON-RPC's method names).
OPERATIONS = frozenset(
    {
        "SendMessage",
        "SendStreamingMessage",
        "GetTask",
        "ListTasks",
        "CancelTask",
        "SubscribeToTask",
        "CreateTaskPushNotificationConfig",
        "GetTaskPushNotificationConfig",
        "ListTaskPushNotificationConfigs",
        "DeleteTaskPushNotificationConfig",
        "GetExtendedAgentCard",
    }
)

R = TypeVar("R")
E = TypeVar("E")


def label(operation: object) -> str:
    """The method label of an operation named by a client: "a2a.<operation>", or UNKNOWN."""
    return PREFIX + operation if isinstance(operation, str) and operation in OPERATIONS else UNKNOWN


def code_of(exc: BaseException) -> str:
    """The gRPC code name of the error a call ends with."""
    if isinstance(exc, A2AError):
        mapping = A2A_ERROR_MAPPING.get(type(exc))
        return mapping.grpc_status if mapping is not None else "UNKNOWN"
    return str(code_pb2.Code.Name(status.to_status(exc).code))


@dataclass
class _Call:
    """One HTTP call: whether the handler ran it (then the handler counted it)."""

    reached: bool = False


_CALL: ContextVar[_Call | None] = ContextVar("keel_a2a_call", default=None)


def _reached() -> None:
    call = _CALL.get()
    if call is not None:
        call.reached = True


async def _unary(name: str, call: Awaitable[R]) -> R:
    _reached()
    started = time.perf_counter()
    code = "OK"
    try:
        return await call
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except Exception as exc:
        code = code_of(exc)
        raise
    finally:
        metrics.RPC_DURATION.labels(name, code).observe(time.perf_counter() - started)


async def _stream(name: str, events: AsyncGenerator[E]) -> AsyncGenerator[E]:
    _reached()
    started = time.perf_counter()
    code = "OK"
    metrics.STREAMS_OPEN.labels(name).inc()
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        code = "CANCELLED"  # the client went away
        raise
    except Exception as exc:
        code = code_of(exc)
        raise
    finally:
        try:
            await events.aclose()
        finally:
            metrics.STREAMS_OPEN.labels(name).dec()
            metrics.RPC_DURATION.labels(name, code).observe(time.perf_counter() - started)


class MeteredRequestHandler(RequestHandler):
    """`handler`, with each operation counted in the RPC metrics as "a2a.<operation>"."""

    def __init__(self, handler: RequestHandler) -> None:
        self._handler = handler

    async def on_get_task(
        self, params: a2a.GetTaskRequest, context: ServerCallContext
    ) -> a2a.Task | None:
        return await _unary("a2a.GetTask", self._handler.on_get_task(params, context))

    async def on_list_tasks(
        self, params: a2a.ListTasksRequest, context: ServerCallContext
    ) -> a2a.ListTasksResponse:
        return await _unary("a2a.ListTasks", self._handler.on_list_tasks(params, context))

    async def on_cancel_task(
        self, params: a2a.CancelTaskRequest, context: ServerCallContext
    ) -> a2a.Task | None:
        return await _unary("a2a.CancelTask", self._handler.on_cancel_task(params, context))

    async def on_message_send(
        self, params: a2a.SendMessageRequest, context: ServerCallContext
    ) -> a2a.Task | a2a.Message:
        return await _unary("a2a.SendMessage", self._handler.on_message_send(params, context))

    # (Plain functions that return the metered stream: a generator around it would
    # leave it to the event loop's finalizer to close.)
    def on_message_send_stream(
        self, params: a2a.SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        events = self._handler.on_message_send_stream(params, context)
        return _stream("a2a.SendStreamingMessage", events)

    def on_subscribe_to_task(
        self, params: a2a.SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        return _stream("a2a.SubscribeToTask", self._handler.on_subscribe_to_task(params, context))

    async def on_create_task_push_notification_config(
        self, params: a2a.TaskPushNotificationConfig, context: ServerCallContext
    ) -> a2a.TaskPushNotificationConfig:
        return await _unary(
            "a2a.CreateTaskPushNotificationConfig",
            self._handler.on_create_task_push_notification_config(params, context),
        )

    async def on_get_task_push_notification_config(
        self, params: a2a.GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> a2a.TaskPushNotificationConfig:
        return await _unary(
            "a2a.GetTaskPushNotificationConfig",
            self._handler.on_get_task_push_notification_config(params, context),
        )

    async def on_list_task_push_notification_configs(
        self, params: a2a.ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> a2a.ListTaskPushNotificationConfigsResponse:
        return await _unary(
            "a2a.ListTaskPushNotificationConfigs",
            self._handler.on_list_task_push_notification_configs(params, context),
        )

    async def on_delete_task_push_notification_config(
        self, params: a2a.DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        await _unary(
            "a2a.DeleteTaskPushNotificationConfig",
            self._handler.on_delete_task_push_notification_config(params, context),
        )

    async def on_get_extended_agent_card(
        self, params: a2a.GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> a2a.AgentCard:
        return await _unary(
            "a2a.GetExtendedAgentCard", self._handler.on_get_extended_agent_card(params, context)
        )


# The HTTP port's answers to calls the handler did not run.
_JSON_RPC_CODES = {  # JSON-RPC's own errors (A2A's: JSON_RPC_ERROR_CODE_MAP)
    -32700: "INVALID_ARGUMENT",  # parse error
    -32600: "INVALID_ARGUMENT",  # invalid request
    -32601: "UNIMPLEMENTED",  # method not found
    -32602: "INVALID_ARGUMENT",  # invalid params
    -32603: "INTERNAL",
}
_A2A_JSON_RPC_CODES = {
    number: mapping.grpc_status
    for error, number in JSON_RPC_ERROR_CODE_MAP.items()
    if (mapping := A2A_ERROR_MAPPING.get(error)) is not None
}
_HTTP_CODES: dict[int, str] = {
    HTTPStatus.BAD_REQUEST: "INVALID_ARGUMENT",
    HTTPStatus.UNAUTHORIZED: "UNAUTHENTICATED",
    HTTPStatus.FORBIDDEN: "PERMISSION_DENIED",
    HTTPStatus.NOT_FOUND: "NOT_FOUND",
    HTTPStatus.METHOD_NOT_ALLOWED: "UNIMPLEMENTED",
    HTTPStatus.CONFLICT: "ABORTED",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "INVALID_ARGUMENT",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "INVALID_ARGUMENT",
    HTTPStatus.TOO_MANY_REQUESTS: "RESOURCE_EXHAUSTED",
    HTTPStatus.NOT_IMPLEMENTED: "UNIMPLEMENTED",
    HTTPStatus.SERVICE_UNAVAILABLE: "UNAVAILABLE",
    HTTPStatus.GATEWAY_TIMEOUT: "DEADLINE_EXCEEDED",
}
_BODY_LIMIT = 64 * 1024  # of an error answer read for its code
_CODE_NAMES = frozenset(code_pb2.Code.keys())


def response_code(http_status: int, body: bytes) -> str:
    """The gRPC code name of the HTTP port's answer to an A2A call: a JSON-RPC error's
    (HTTP 200), a REST error's `status`, the port's own error's `code`, else the HTTP
    status's."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            number = error.get("code")
            name = error.get("status")
            if isinstance(name, str) and name in _CODE_NAMES:
                return name  # HTTP+JSON: {"error": {"code": 404, "status": "NOT_FOUND"}}
            if isinstance(number, int) and http_status == HTTPStatus.OK:  # JSON-RPC
                return _JSON_RPC_CODES.get(number) or _A2A_JSON_RPC_CODES.get(number, "UNKNOWN")
        name = parsed.get("code")
        if isinstance(name, str) and name.upper() in _CODE_NAMES:
            return name.upper()  # the port's errors: {"code": "not_found", ...}
    if 200 <= http_status < 300:
        return "OK"
    return _HTTP_CODES.get(http_status, "INTERNAL" if http_status >= 500 else "UNKNOWN")


def rest_operation(method: str, route: str) -> str:
    """The A2A operation of an HTTP+JSON route (the path after ".../rest/"), or ""."""
    if route == "message:send" and method == "POST":
        return "SendMessage"
    if route == "message:stream" and method == "POST":
        return "SendStreamingMessage"
    if route == "tasks":
        return "ListTasks" if method == "GET" else ""
    if route == "extendedAgentCard":
        return "GetExtendedAgentCard" if method == "GET" else ""
    if not route.startswith("tasks/"):
        return ""
    task, _, configs = route[len("tasks/") :].partition("/")
    if not task:
        return ""
    if not configs:
        if task.endswith(":cancel"):
            return "CancelTask" if method == "POST" else ""
        if task.endswith(":subscribe"):
            return "SubscribeToTask" if method in ("GET", "POST") else ""
        return "GetTask" if method == "GET" else ""
    name, _, config = configs.partition("/")
    if name != "pushNotificationConfigs" or "/" in config:
        return ""
    if config:
        return {
            "GET": "GetTaskPushNotificationConfig",
            "DELETE": "DeleteTaskPushNotificationConfig",
        }.get(method, "")
    return {
        "POST": "CreateTaskPushNotificationConfig",
        "GET": "ListTaskPushNotificationConfigs",
    }.get(method, "")


async def serve(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    operation: str,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """`app`'s answer to an A2A call on the HTTP port (`operation` the method or route's
    operation as the client named it); counted here when the handler did not run it."""
    call = _Call()
    token = _CALL.set(call)
    started = time.perf_counter()
    answer: list[int] = []  # the HTTP status, when the handler did not run the call
    body = bytearray()

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and not call.reached:
            answer.append(int(message["status"]))
        elif message["type"] == "http.response.body" and answer and len(body) < _BODY_LIMIT:
            body.extend(message.get("body", b"")[: _BODY_LIMIT - len(body)])
        await send(message)

    code = ""
    try:
        await app(scope, receive, sending)
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except Exception:
        code = "INTERNAL"
        raise
    finally:
        _CALL.reset(token)
        if not call.reached:
            if not code:
                code = response_code(answer[0], bytes(body)) if answer else "UNKNOWN"
            metrics.RPC_DURATION.labels(label(operation), code).observe(
                time.perf_counter() - started
            )
