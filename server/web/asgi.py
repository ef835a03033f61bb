"""The few ASGI types and responses the HTTP port's routes share."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from server.web.errors import Problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]


def request_headers(scope: Scope) -> dict[str, str]:
    """The request's headers, names lower-cased (a repeated header: its last value)."""
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", ())
    }


async def respond(
    send: Send, status: int, body: bytes = b"", headers: Headers = (), content_type: str = ""
) -> None:
    """A whole response at once."""
    all_headers = list(headers)
    if content_type:
        all_headers.append((b"content-type", content_type.encode()))
    all_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def respond_problem(send: Send, problem: Problem, headers: Headers = ()) -> None:
    """An error as JSON: Connect's error body ({"code", "message", "details"})."""
    body = json.dumps(problem.body(), ensure_ascii=False).encode()
    await respond(send, problem.http_status, body, headers, "application/json")
