"""The HTTP port's ASGI application: one port, four kinds of route, and CORS in front of them.

    POST /keel.v1.AgentService/<Method>   Connect (JSON, binary) and gRPC-Web (connect.py)
    GET  /v1/runs/{run_id}/events         the run's events as Server-Sent Events (sse.py)
    GET  /console/...                     the console's built files (console.py)
    GET  /                                redirects to /console/
    /a2a/..., /.well-known/agent-card.json  A2A (server/a2a/web.py, docs/a2a.md)

Anything else is 404, and a route asked with a method it does not take
405 (with Allow), each with Connect's JSON error body; so is a call
connectrpc cannot take (415 for a content type no protocol here has, 400
for a header that is not UTF-8).

CORS: a request from a page of another origin (its Origin header) is
served only when that origin is one of the allowed ones (KEEL_HTTP_CORS_ORIGINS,
"*" for any); a preflight (OPTIONS) for such an origin is answered with the
methods and headers Connect, gRPC-Web and SSE use, and the response headers
a browser may read (grpc-status, grpc-message, ...). Any other Origin is
refused with 403. A request from the port's own origin (the console) or
with no Origin (not a browser) needs no CORS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus

from google.rpc import code_pb2

from server.api.servicer import SERVICE, AgentServicer
from server.auth.gate import Gate
from server.web import sse
from server.web.asgi import (
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    request_headers,
    respond,
    respond_problem,
)
from server.web.connect import connect_application
from server.web.console import PREFIX as CONSOLE
from server.web.console import Console
from server.web.errors import Problem, http_problem, not_allowed, not_found

_METHODS = frozenset(f"/{SERVICE.full_name}/{method.name}" for method in SERVICE.methods)
_ALLOW_HEADERS = (
    b"authorization, content-type, connect-protocol-version, connect-timeout-ms, "
    b"connect-accept-encoding, connect-content-encoding, content-encoding, accept-encoding, "
    b"grpc-timeout, x-grpc-web, x-user-agent, last-event-id, "
    b"a2a-version, a2a-extensions, keel-next-offset"  # A2A's service parameters
)
_EXPOSE_HEADERS = (
    b"grpc-status, grpc-message, grpc-status-details-bin, content-encoding, "
    b"connect-content-encoding"
)
_PREFLIGHT_MAX_AGE_S = 7200


class WebApplication:
    """AgentService for browsers and HTTP clients, beside the gRPC port."""

    def __init__(
        self,
        servicer: AgentServicer,
        gate: Gate,
        *,
        cors_origins: Iterable[str],
        console: Console,
        read_max_bytes: int,
        a2a: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None,
        is_a2a_path: Callable[[str], bool] | None = None,
    ) -> None:
        self._a2a = a2a  # A2A's routes (server/a2a/web.py), if served
        self._is_a2a_path = is_a2a_path
        self._servicer = servicer
        self._gate = gate
        self._connect = connect_application(servicer, gate, read_max_bytes=read_max_bytes)
        origins = {origin.rstrip("/") for origin in cors_origins}
        self._any_origin = "*" in origins
        self._origins = frozenset(origins - {"*"})
        self._console = console
        self._event_text = sse.EventText()
        self._read_max_bytes = read_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: not served (hypercorn closes the connection)
        if not (sse.ROUTE.match(scope["path"]) and scope["method"] in ("GET", "HEAD")):
            # (The SSE route reads receive() itself, for the client's going; a GET has no body.)
            body = _Body(receive, self._read_max_bytes)
            receive, send = body, _ending_after_body(send, body)
        headers = request_headers(scope)
        origin = headers.get("origin")
        cors: Headers = []
        if origin is not None and origin != _own_origin(scope, headers):
            if not (self._any_origin or origin in self._origins):
                await respond_problem(send, _forbidden_origin(origin))
                return
            cors = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await respond(send, 204, headers=[*cors, *_preflight()])
                return
            cors.append((b"access-control-expose-headers", _EXPOSE_HEADERS))
            send = _with_headers(send, cors)
        await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in _METHODS:
            if method != "POST":
                await respond_problem(send, *not_allowed(method, path, "POST"))
                return
            refused = _unanswerable(scope)
            if refused is not None:
                await respond_problem(send, refused)
                return
            await self._connect(scope, receive, _json_unsupported_media_type(send, scope))
            return
        if self._a2a is not None and self._is_a2a_path is not None and self._is_a2a_path(path):
            await self._a2a(scope, receive, send)
            return
        if (match := sse.ROUTE.match(path)) is not None:
            if method not in ("GET", "HEAD"):
                await respond_problem(send, *not_allowed(method, path, "GET"))
                return
            await sse.serve_events(
                scope, receive, send, self._servicer, self._gate, match[1], self._event_text
            )
            return
        if path == CONSOLE or path.startswith(CONSOLE + "/") or path == "/":
            if method not in ("GET", "HEAD"):
                await respond_problem(send, *not_allowed(method, path, "GET"))
                return
            if path in ("/", CONSOLE):
                await respond(send, 308, headers=[(b"location", b"/console/")])
                return
            await self._console.serve(path, send, head=method == "HEAD")
            return
        await respond_problem(send, not_found(path))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def _own_origin(scope: Scope, headers: dict[str, str]) -> str:
    return f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"


def _forbidden_origin(origin: str) -> Problem:
    return http_problem(
        HTTPStatus.FORBIDDEN,
        code_pb2.PERMISSION_DENIED,
        f"origin {origin!r} is not allowed: add it to KEEL_HTTP_CORS_ORIGINS",
        "ORIGIN_NOT_ALLOWED",
    )


def _unsupported_media_type(content_type: str, why: str = "") -> Problem:
    return http_problem(
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        code_pb2.UNIMPLEMENTED,
        why
        or f"content type {content_type!r} is not served: a call takes application/proto or "
        "application/json (Connect; application/connect+proto or +json for a streaming "
        "method), or application/grpc-web+proto or +json (gRPC-Web)",
        "UNSUPPORTED_MEDIA_TYPE",
    )


def _unanswerable(scope: Scope) -> Problem | None:
    """A call connectrpc would fail on with an exception (a 500, or gRPC's UNKNOWN), not a
    status: a header that is not UTF-8 (it decodes them all as UTF-8), or gRPC without
    HTTP/2 (gRPC's status comes in trailers, which HTTP/1.1 responses do not have here)."""
    for name, value in scope.get("headers", ()):
        try:
            name.decode()
            value.decode()
        except UnicodeDecodeError:
            return http_problem(
                HTTPStatus.BAD_REQUEST,
                code_pb2.INVALID_ARGUMENT,
                f"header {name.decode('latin-1')!r} is not UTF-8",
                "INVALID_HEADER",
            )
    content_type = request_headers(scope).get("content-type", "")
    grpc = content_type == "application/grpc" or content_type.startswith("application/grpc+")
    if grpc and "http.response.trailers" not in scope.get("extensions", {}):
        return _unsupported_media_type(
            content_type,
            "gRPC needs HTTP/2 (its status comes in trailers): call the gRPC port, or use "
            "Connect or gRPC-Web on this one",
        )
    return None


def _json_unsupported_media_type(send: Send, scope: Scope) -> Send:
    """`send`, with Connect's JSON error body on connectrpc's 415 (it has none)."""
    replaced = False

    async def sending(message: Message) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] == 415:
            replaced = True
            kept = [
                (name, value)
                for name, value in message.get("headers", ())
                if name.lower() not in (b"content-type", b"content-length")
            ]
            content_type = request_headers(scope).get("content-type", "")
            await respond_problem(send, _unsupported_media_type(content_type), kept)
        elif not replaced:  # connectrpc's empty body is replaced too
            await send(message)

    return sending


def _preflight() -> Headers:
    return [
        (b"access-control-allow-methods", b"GET, POST"),
        (b"access-control-allow-headers", _ALLOW_HEADERS),
        (b"access-control-max-age", str(_PREFLIGHT_MAX_AGE_S).encode()),
    ]


class _Body:
    """The request's receive(), noting when its body has all been read."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.done = False

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.done = True
        return message

    async def drain(self) -> None:
        """Read (and drop) what is left of the body, up to the size a request may have."""
        read = 0
        while not self.done and read <= self._limit:
            read += len((await self()).get("body", b""))


def _ending_after_body(send: Send, body: _Body) -> Send:
    """`send`, reading the rest of the request's body before the response ends. An answer
    that ends before its request's body is in (an error does, without reading it) is one
    hypercorn mishandles: on HTTP/2 a DATA frame that comes after it (even the empty one
    that ends a request) makes it drop the connection, and every stream on it; on
    HTTP/1.1 the next request on the connection may go unanswered."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            await body.drain()
        await send(message)

    return sending


def _with_headers(send: Send, extra: Headers) -> Send:
    """`send`, adding `extra` to the response's headers."""

    async def sending(message: dict) -> None:  # type: ignore[type-arg]
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return sending  # type: ignore[return-value]
