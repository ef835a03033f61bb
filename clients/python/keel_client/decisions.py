"""Decisions for a suspended run: approve, deny or answer a pending tool call with Resume.

``deliver`` sends one Resume and returns the stream's snapshot, which the
server sends once it has stored the decisions; then it cancels the stream
(the run goes on, and any observer of the run sees it resume). A Resume that
fails with UNAVAILABLE is sent again, with the same request_id (the server
gives it one effect), after the client's backoff. Every other status is the
server's answer and is raised: FAILED_PRECONDITION (RUN_NOT_SUSPENDED,
INTERRUPT_RESOLVED), ABORTED (CONCURRENT_MODIFICATION), INVALID_ARGUMENT,
NOT_FOUND, ALREADY_EXISTS (REQUEST_ID_REUSED).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from keel.v1 import agent_service_pb2 as pb

from keel_client.backoff import Backoff
from keel_client.errors import StreamContractError

if TYPE_CHECKING:
    from keel.v1.agent_service_pb2_grpc import AgentServiceAsyncStub


def approval(tool_call_id: str, override_args: Mapping[str, Any] | None = None) -> pb.Decision:
    """Approve a tool call; ``override_args`` (a JSON object) replaces the model's arguments."""
    if override_args is not None and not isinstance(override_args, Mapping):
        raise TypeError("override_args must be a mapping (a JSON object)")
    args = "" if override_args is None else json.dumps(override_args)
    return pb.Decision(tool_call_id=tool_call_id, approve=pb.Approve(override_args_json=args))


def denial(tool_call_id: str, message: str = "") -> pb.Decision:
    """Deny a tool call; the model sees ``message``."""
    return pb.Decision(tool_call_id=tool_call_id, deny=pb.Deny(message=message))


def answer(tool_call_id: str, result: Any) -> pb.Decision:
    """The result of a deferred tool call: any JSON-serializable value."""
    return pb.Decision(tool_call_id=tool_call_id, result_json=json.dumps(result))


async def deliver(
    stub: Callable[[], AgentServiceAsyncStub],
    run_id: str,
    decisions: Sequence[pb.Decision],
    *,
    request_id: str | None,
    backoff: Backoff,
    max_reconnects: int | None,
) -> pb.RunSnapshot:
    """Send Resume(run_id, decisions) until the server acknowledges it; its snapshot."""
    request = pb.ResumeRequest(
        run_id=run_id, decisions=decisions, request_id=request_id or str(uuid.uuid4())
    )
    failures = 0
    while True:
        call = stub().Resume(request)
        try:
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind != "snapshot":
                    raise StreamContractError(
                        f"the Resume stream sent {kind!r} before its snapshot"
                    )
                return message.snapshot
            raise StreamContractError(f"the Resume stream of run {run_id} ended without a snapshot")
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            if max_reconnects is not None and failures >= max_reconnects:
                raise
        finally:
            call.cancel()
        await asyncio.sleep(backoff.delay_s(failures))
        failures += 1
