"""A2A's gRPC binding (lf.a2a.v1.A2AService) on Keel's gRPC server, behind the Gate.

The a2a-sdk's GrpcHandler serves it over the KeelRequestHandler; the agent is
the request's `tenant` field (the card's gRPC interface names it, and the SDK's
client copies it into every request), the default agent when empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from a2a.server.request_handlers.grpc_handler import GrpcHandler
from a2a.types import a2a_pb2_grpc
from grpc_status import rpc_status

from server.a2a.handler import KeelRequestHandler
from server.api import status
from server.auth.gate import Gate, authorize
from server.auth.keys import Role
from server.errors import PermissionDenied, Unauthenticated

SERVICE = "lf.a2a.v1.A2AService"
_IDENTIFY_AS = "ListAgents"  # every key may identify itself (any role reads)
_RUNNING = frozenset(
    {
        "SendMessage",
        "SendStreamingMessage",
        "CancelTask",
        "CreateTaskPushNotificationConfig",
        "DeleteTaskPushNotificationConfig",
    }
)
_RUNNER_METHOD = "StartRun"  # a Keel method that needs the runner role, as _RUNNING do


def add_to_server(handler: KeelRequestHandler, server: grpc.aio.Server) -> None:
    a2a_grpc: Any = a2a_pb2_grpc
    a2a_grpc.add_A2AServiceServicer_to_server(GrpcHandler(handler), server)


class A2AAuthInterceptor(grpc.aio.ServerInterceptor):
    """The Gate for A2AService: UNAUTHENTICATED without a valid key; PERMISSION_DENIED
    for a reader sending messages or cancelling."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service != SERVICE:
            return handler
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        try:
            metadata = {
                key: value
                for key, value in context.invocation_metadata() or ()
                if isinstance(value, str)
            }
            caller = self._gate.admit(_IDENTIFY_AS, metadata, context.auth_context())
            if method in _RUNNING and not caller.role.allows(Role.RUNNER):
                try:
                    authorize(caller, _RUNNER_METHOD)
                except PermissionDenied:
                    raise PermissionDenied(method, caller.role.value, Role.RUNNER.value) from None
        except (Unauthenticated, PermissionDenied) as exc:
            await context.abort_with_status(rpc_status.to_status(status.to_status(exc)))
            return False
        return True

    def _unary(self, method: str, behavior: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not await self._admit(method, context):
                return None
            return await behavior(request, context)

        return unary

    def _streaming(self, method: str, behavior: Any) -> Any:
        async def streaming(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if not await self._admit(method, context):
                return
            async for response in behavior(request, context):
                yield response

        return streaming
