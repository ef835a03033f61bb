"""The errors keel_client raises besides gRPC's own (``grpc.aio.AioRpcError``)."""

from __future__ import annotations


class StreamContractError(RuntimeError):
    """The server broke the stream contract: a gap in the event indices, a
    message before the snapshot, or a snapshot of another run. Never retried:
    it is a bug, and resuming would hide lost events."""
