"""A2A's gRPC binding (lf.a2a.v1.A2AService) on Keel's gRPC server, behind the Gate.

The a2a-sdk's GrpcHandler serves it over the KeelRequestHandler; the agent is
the request's `tenant` field (the card's gRPC interface names it, and the SDK's
client copies it into every request), the default agent when empty. Its calls
count in the RPC metrics as "a2a.<operation>" (server/a2a/metered.py).
"""

from __future__ import annotations

from typing import Any

import grpc
from a2a.server.request_handlers.grpc_handler import GrpcHandler
from a2a.types import a2a_pb2_grpc

from server.a2a.handler import KeelRequestHandler
from server.a2a.metered import MeteredRequestHandler


def add_to_server(handler: KeelRequestHandler, server: grpc.aio.Server) -> None:
    """Serve A2AService on `server`; put it behind the gate with
    `AuthInterceptor(gate, service=A2A_SERVICE, roles=A2A_METHOD_ROLES)`."""
    a2a_grpc: Any = a2a_pb2_grpc
    a2a_grpc.add_A2AServiceServicer_to_server(GrpcHandler(MeteredRequestHandler(handler)), server)
