"""GET /v1/runs/{run_id}/events: a run's events as Server-Sent Events, resumable like Observe.

Each event goes out as an SSE message whose `id:` is its index and whose
`data:` is the AgentEvent in protobuf's canonical JSON, so a browser's
EventSource, reconnecting by itself, sends `Last-Event-ID: <last index>`
and the stream resumes at the next index: every event exactly once, as
Observe(run_id, offset = Last-Event-ID + 1) gives them. The first
connection starts at `?offset=` (default 0); `?incarnation=` is Observe's
incarnation (LOG_ROLLED_BACK when the run's store lost history).

- The stream opens with `event: snapshot` (the Run, no id: an EventSource's
  last event id stays that of the last event).
- Heartbeats are SSE comments (`: heartbeat next_offset=N`): they keep
  proxies from closing a quiet stream and are invisible to EventSource.
- After the run's terminal event the stream ends; a reconnection at the
  end of an ended run gets 204 No Content, which tells an EventSource to
  stop reconnecting.
- Errors before the stream starts are HTTP statuses with Connect's JSON
  error body (errors.py): 400 for a Last-Event-ID or offset that is not a
  number, 404 for an unknown run, 400 for OFFSET_EXPIRED, 401/403 without
  credentials, 503 while the server drains. An error after the stream
  started is sent as `event: error` (the same JSON), then the stream ends
  (an EventSource reconnects and gets the error as a status, or resumes).

Credentials: `authorization: Bearer <key>` as on every call. A browser's
EventSource cannot send headers: on a server with API keys, read the
stream with fetch() (or Observe over Connect).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator
from typing import Any, cast
from urllib.parse import parse_qs

from keel.v1 import agent_service_pb2 as pb

from server.api.convert import LastBatch
from server.api.servicer import AgentServicer
from server.auth.gate import Gate
from server.errors import FieldViolation, InvalidArgument
from server.web.asgi import Receive, Scope, Send, request_headers, respond, respond_problem
from server.web.codecs import to_json
from server.web.errors import problem

ROUTE = re.compile(r"^/v1/runs/([^/]+)/events$")
_INDEX = re.compile(r"^\s*(\d{1,18})\s*$")
_TERMINAL = frozenset({pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED})
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]


class EventText:
    """The SSE text of each response. A run's event batches come encoded once for every
    stream that carries them (servicer._events_response); the last one's text is kept,
    so the SSE streams of one run share that work too."""

    def __init__(self) -> None:
        self._last_batch = LastBatch[str]()

    def __call__(self, response: pb.ObserveResponse | bytes) -> str:
        if not isinstance(response, bytes):
            return _text(response)
        return self._last_batch.get(
            response, lambda data: _text(pb.ObserveResponse.FromString(data))
        )


def observe_request(run_id: str, scope: Scope, headers: dict[str, str]) -> pb.ObserveRequest:
    """The Observe a request of this route means (InvalidArgument for a bad resume point)."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    last_event_id = headers.get("last-event-id")
    if last_event_id is not None:
        match = _INDEX.match(last_event_id)
        if match is None:
            raise InvalidArgument(
                FieldViolation("Last-Event-ID", "must be an event index (a non-negative integer)")
            )
        offset = int(match.group(1)) + 1
    elif "offset" in query:
        match = _INDEX.match(query["offset"][-1])
        if match is None:
            raise InvalidArgument(FieldViolation("offset", "must be a non-negative integer"))
        offset = int(match.group(1))
    else:
        offset = 0
    incarnation = query.get("incarnation", [""])[-1]
    return pb.ObserveRequest(run_id=run_id, offset=offset, incarnation=incarnation)


async def serve_events(
    scope: Scope,
    receive: Receive,
    send: Send,
    servicer: AgentServicer,
    gate: Gate,
    run_id: str,
    text: EventText,
) -> None:
    """The route's handler: runs until the stream ends or the client goes away."""
    stream = asyncio.ensure_future(_stream(scope, send, servicer, gate, run_id, text))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((stream, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stream, gone):
            task.cancel()
        await asyncio.gather(stream, gone, return_exceptions=True)
    if stream.done() and not stream.cancelled() and stream.exception() is not None:
        raise stream.exception()  # type: ignore[misc]


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream(
    scope: Scope, send: Send, servicer: AgentServicer, gate: Gate, run_id: str, text: EventText
) -> None:
    headers = request_headers(scope)
    try:
        gate.admit("Observe", {} if gate.open else headers)
        request = observe_request(run_id, scope, headers)
        # An async generator (the servicer's handlers are), closed below.
        responses = cast(AsyncGenerator[Any, None], servicer.Observe(request, None))
        first = await anext(responses)
    except Exception as exc:
        await respond_problem(send, problem(exc))
        return
    try:
        snapshot = pb.ObserveResponse.FromString(first) if isinstance(first, bytes) else first
        run = snapshot.snapshot.run
        if run.state in _TERMINAL and request.offset >= run.next_offset:
            await respond(send, 204)  # nothing more will come: EventSource stops here
            return
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        if scope["method"] == "HEAD":
            # The headers a GET gets, and the end: a stream left open would hold the
            # connection, which the client may reuse (HTTP/1.1) once it has the headers.
            await send({"type": "http.response.body", "body": b""})
            return
        await _send(send, f"event: snapshot\ndata: {to_json(run)}\n\n")
        try:
            async for response in responses:
                await _send(send, text(response))
        except Exception as exc:
            body = problem(exc).body()
            await _send(send, f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n")
        await send({"type": "http.response.body", "body": b""})
    finally:
        await responses.aclose()


def _text(response: pb.ObserveResponse) -> str:
    kind = response.WhichOneof("kind")
    if kind == "events":
        return "".join(f"id: {e.index}\ndata: {to_json(e)}\n\n" for e in response.events.events)
    if kind == "heartbeat":
        return f": heartbeat next_offset={response.heartbeat.next_offset}\n\n"
    return ""


async def _send(send: Send, text: str) -> None:
    if text:
        await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
