"""AgentService over Connect and gRPC-Web: the gRPC servicer's own methods, behind the same gate.

connectrpc's generated ASGI application (keel.v1.agent_service_connect)
decodes each request (Connect's JSON or binary, or gRPC-Web), calls the
method of the service it is given, and encodes the answer. The service here
is a thin face of the AgentServicer: each method admits the caller through
the Gate (API keys, roles and tenants as on gRPC), calls the servicer's
method of the same name, and turns a domain error into the ConnectError
with the same code, message and details as the gRPC status
(status.to_connect_error). One servicer, two transports.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from connectrpc.request import RequestContext
from google.protobuf.message import Message
from keel.v1 import agent_service_pb2 as pb
from keel.v1.agent_service_connect import AgentServiceASGIApplication

from server import tracing
from server.api import status
from server.api.servicer import SERVICE, AgentServicer
from server.auth.gate import Gate
from server.web.codecs import CODECS, Encoded

Unary = Callable[[Message, RequestContext[Any, Any]], Awaitable[Message]]
Streaming = Callable[[Message, RequestContext[Any, Any]], AsyncIterator[Message | Encoded]]


def snake_case(name: str) -> str:
    """The generated service's name of a method: StartRun -> start_run."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class ConnectService:
    """Every AgentService method, named as connectrpc's generated application calls them."""

    def __init__(self, servicer: AgentServicer, gate: Gate) -> None:
        self._servicer = servicer
        self._gate = gate
        for method in SERVICE.methods:
            face: Unary | Streaming
            if method.server_streaming:
                face = self._streaming(method.name, getattr(pb, method.output_type.name))
            else:
                face = self._unary(method.name)
            setattr(self, snake_case(method.name), face)

    def _admit(self, method: str, ctx: RequestContext[Any, Any]) -> None:
        self._gate.admit(method, {} if self._gate.open else dict(ctx.request_headers))

    def _unary(self, name: str) -> Unary:
        behavior = getattr(self._servicer, name)

        async def call(request: Message, ctx: RequestContext[Any, Any]) -> Message:
            try:
                self._admit(name, ctx)
                response: Message = await behavior(request, ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise status.to_connect_error(exc) from None
            return response

        return call

    def _streaming(self, name: str, response_type: type[Message]) -> Streaming:
        behavior = getattr(self._servicer, name)

        async def call(
            request: Message, ctx: RequestContext[Any, Any]
        ) -> AsyncIterator[Message | Encoded]:
            try:
                self._admit(name, ctx)
                async for response in behavior(request, ctx):
                    # A run's event batches come encoded already (codecs.py).
                    if isinstance(response, bytes):
                        response = Encoded(response, response_type)
                    yield response
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise status.to_connect_error(exc) from None

        return call


def connect_application(
    servicer: AgentServicer, gate: Gate, *, read_max_bytes: int
) -> AgentServiceASGIApplication:
    """The ASGI application of AgentService's Connect and gRPC-Web routes."""
    return AgentServiceASGIApplication(
        ConnectService(servicer, gate),
        read_max_bytes=read_max_bytes,
        interceptors=tracing.connect_interceptors(),
        codecs=CODECS,
    )
