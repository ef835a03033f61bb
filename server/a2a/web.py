"""A2A on the HTTP port: agent cards and the JSON-RPC binding, behind the Gate (docs/a2a.md).

    GET  /.well-known/agent-card.json          the default agent's card
    GET  /a2a/{agent_id}/.well-known/agent-card.json
    POST /a2a/{agent_id}                       JSON-RPC (the a2a-sdk's dispatcher)
    *    /a2a/{agent_id}/rest/...              HTTP+JSON (the a2a-sdk's REST routes)

Cards are public. Any other call passes the Gate first: without a valid API
key (on a server with keys) it is answered 401 with the port's JSON error, and
sending or cancelling with a reader's key 403 (the handler checks roles too).
A body over `read_max_bytes` is answered 413 with a JSON-RPC error. The calls
the Gate lets through count in the RPC metrics as "a2a.<operation>"
(server/a2a/metered.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.server.routes.jsonrpc_routes import create_jsonrpc_routes
from a2a.server.routes.rest_routes import create_rest_routes
from a2a.types import a2a_pb2 as a2a
from google.rpc import code_pb2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.a2a import metered
from server.a2a.cards import CARD_PATH, PREFIX, REST
from server.a2a.handler import AGENT_STATE, KeelRequestHandler
from server.a2a.metered import MeteredRequestHandler
from server.auth.gate import A2A_METHOD_ROLES, Gate, authorize
from server.auth.keys import Role
from server.errors import PermissionDenied, Unauthenticated
from server.web.asgi import Message, Receive, Scope, Send, request_headers, respond, respond_problem
from server.web.errors import http_problem, not_allowed, not_found


class _ContextBuilder(DefaultServerCallContextBuilder):
    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state[AGENT_STATE] = request.path_params.get("agent_id", "")
        return context


def is_a2a_path(path: str) -> bool:
    return path in (CARD_PATH, PREFIX) or path.startswith(PREFIX + "/")


class A2AApplication:
    """The ASGI application of the A2A routes (WebApplication sends them here)."""

    def __init__(
        self,
        handler: KeelRequestHandler,
        gate: Gate,
        *,
        cards: Callable[[str, str], a2a.AgentCard],
        default_agent: str,
        read_max_bytes: int,
    ) -> None:
        self._handler = handler
        self._gate = gate
        self._cards = cards
        self._default_agent = default_agent
        self._read_max_bytes = read_max_bytes
        counted = MeteredRequestHandler(handler)  # in the RPC metrics (server/a2a/metered.py)
        routes = [
            Route(CARD_PATH, self._default_card, methods=["GET"]),
            Route(PREFIX + "/{agent_id}" + CARD_PATH, self._agent_card, methods=["GET"]),
            *create_jsonrpc_routes(
                counted, PREFIX + "/{agent_id}", context_builder=_ContextBuilder()
            ),
            # (Without the SDK's "/{tenant}" mount of the same routes: the path names
            # the agent here, and that mount would take every path.)
            *(
                route
                for route in create_rest_routes(
                    counted,
                    context_builder=_ContextBuilder(),
                    path_prefix=PREFIX + "/{agent_id}/" + REST,
                )
                if isinstance(route, Route)
            ),
        ]
        self._app = Starlette(routes=routes)
        self._app.router.redirect_slashes = False  # a path is served as it is, or 404

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        send = _port_errors(send, scope)
        path: str = scope["path"]
        if not path.startswith(PREFIX + "/"):
            await self._app(scope, receive, send)  # the default card
            return
        agent_id, _, rest = path[len(PREFIX) + 1 :].partition("/")
        if agent_id not in self._handler.agents:
            await respond_problem(
                send,
                http_problem(
                    HTTPStatus.NOT_FOUND,
                    code_pb2.NOT_FOUND,
                    f"no agent {agent_id[:200]!r} here",
                    "AGENT_NOT_FOUND",
                ),
            )
            return
        if "/" + rest == CARD_PATH:
            await self._app(scope, receive, send)  # cards are public
            return
        try:
            # Any role: what an operation needs is checked once it is known.
            caller = self._gate.identify(request_headers(scope))
        except Unauthenticated as exc:
            problem = http_problem(
                HTTPStatus.UNAUTHORIZED, code_pb2.UNAUTHENTICATED, str(exc), "UNAUTHENTICATED"
            )
            await respond_problem(send, problem, [(b"www-authenticate", b"Bearer")])
            return
        request: object = None
        if scope["method"] == "POST":
            body = await self._body(receive)
            if body is None:
                error = {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {
                        "code": -32600,
                        "message": f"the request is over {self._read_max_bytes} bytes",
                    },
                }
                await respond(send, 413, json.dumps(error).encode(), (), "application/json")
                return
            try:
                request = json.loads(body) if body.strip() else None
            except ValueError as exc:
                if rest != "":  # (JSON-RPC's dispatcher answers -32700)
                    problem = http_problem(
                        HTTPStatus.BAD_REQUEST,
                        code_pb2.INVALID_ARGUMENT,
                        f"the body is not JSON: {str(exc)[:200]}",
                        "INVALID_JSON",
                    )
                    await respond_problem(send, problem)
                    return
                request = None
            except RecursionError:
                # (The SDK would fail on it with a 500.)
                error = {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {"code": -32700, "message": "the JSON is nested too deeply"},
                }
                await respond(send, 400, json.dumps(error).encode(), (), "application/json")
                return
            operation = _running_operation(rest, request)
            if operation:
                try:
                    authorize(caller, operation, A2A_METHOD_ROLES)
                except PermissionDenied as refused:
                    problem = http_problem(
                        HTTPStatus.FORBIDDEN,
                        code_pb2.PERMISSION_DENIED,
                        str(refused),
                        "PERMISSION_DENIED",
                    )
                    await respond_problem(send, problem)
                    return
            receive = _replay(body, receive)
        await metered.serve(self._app, _operation(scope, rest, request), scope, receive, send)

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole body, or None (and the rest read and dropped) when it is too big."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self._read_max_bytes:
                chunks.append(chunk)
            more = message.get("more_body", False)
        return None if size > self._read_max_bytes else b"".join(chunks)

    async def _default_card(self, request: Request) -> Response:
        return self._card_response(request, self._default_agent)

    async def _agent_card(self, request: Request) -> Response:
        return self._card_response(request, request.path_params["agent_id"])

    def _card_response(self, request: Request, agent_id: str) -> Response:
        if agent_id not in self._handler.agents:
            return JSONResponse({"code": "not_found", "message": "no agent here"}, 404)
        base = f"{request.url.scheme}://{request.url.netloc}"
        return JSONResponse(agent_card_to_dict(self._cards(agent_id, base)))


def _operation(scope: Scope, rest: str, request: object) -> str:
    """The A2A operation a call names (its JSON-RPC method, or its REST route's), or ""."""
    if rest == "":
        method = request.get("method") if isinstance(request, dict) else None
        return method if isinstance(method, str) else ""
    if rest.startswith(REST + "/"):
        return metered.rest_operation(str(scope["method"]), rest[len(REST) + 1 :])
    return ""


def _running_operation(rest: str, request: object) -> str:
    """The operation of a POST (its parsed JSON body) that needs the runner role ("" for
    none): a JSON-RPC method, or a REST route (message:send, message:stream, tasks/{id}:cancel)."""
    if rest == "":
        method = request.get("method") if isinstance(request, dict) else None
        running = isinstance(method, str) and A2A_METHOD_ROLES.get(method) is Role.RUNNER
        return str(method) if running else ""
    if rest.startswith(REST + "/"):
        route = rest[len(REST) + 1 :]
        if route in ("message:send", "message:stream"):
            return "SendMessage"
        if route.startswith("tasks/") and route.endswith(":cancel"):
            return "CancelTask"
        if route.startswith("tasks/") and "/pushNotificationConfigs" in route:
            return "CreateTaskPushNotificationConfig"
    return ""


def _port_errors(send: Send, scope: Scope) -> Send:
    """`send`, answering Starlette's plain-text 404 and 405 with the port's JSON errors."""
    replaced = False

    async def sending(message: Message) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] in (404, 405):
            headers = dict(message.get("headers", ()))
            if headers.get(b"content-type", b"").startswith(b"text/plain"):
                replaced = True
                path = str(scope["path"])
                if message["status"] == 404:
                    await respond_problem(send, not_found(path))
                else:
                    allow = headers.get(b"allow", b"").decode("latin-1")
                    await respond_problem(send, *not_allowed(str(scope["method"]), path, allow))
                return
        if not replaced:
            await send(message)

    return sending


def _replay(body: bytes, then: Receive) -> Receive:
    """receive() giving the body read already, then the request's own (its disconnect: a
    stream's end when the client goes)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive
