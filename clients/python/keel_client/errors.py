"""The errors keel_client raises besides gRPC's own (``grpc.aio.AioRpcError``)."""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
T = TypeVar("T", int, None)


class StreamContractError(RuntimeError):
    """The server broke the stream contract: a gap in the event indices, a
    message before the snapshot, or a snapshot of another run. Never retried:
    it is a bug, and resuming would hide lost events."""


class LogRolledBack(RuntimeError):
    """The run's store lost events this client already received.

    The store came back with an older state (a Redis restart from old files,
    a failover to a replica that lagged) and carried on from there, so some
    indices the client has already seen now hold other events, or do not
    exist yet. The server answered Observe with FAILED_PRECONDITION
    (LOG_ROLLED_BACK); the original ``grpc.aio.AioRpcError`` is
    ``__cause__``. Never retried: resuming would mix two histories.

    What to do: the events the client holds from ``diverged_at`` on (all of
    them when it is None) are not the run's any more. Discard them and read
    the run again from ``diverged_at`` (``handle.events(from_offset=diverged_at)``),
    or from 0 when ``diverged_at`` is None.

    Attributes: ``run_id``; ``offset``, the offset the client resumed at (it
    holds events up to ``offset - 1``); ``next_offset``, the log's head now;
    ``incarnation``, the incarnation the client sent (the store's life that
    wrote the last event it holds); ``diverged_at``, the first index whose
    event the client holds but the log no longer has (None: unknown).
    """

    def __init__(
        self,
        run_id: str,
        offset: int,
        next_offset: int,
        incarnation: str,
        diverged_at: int | None,
    ) -> None:
        self.run_id = run_id
        self.offset = offset
        self.next_offset = next_offset
        self.incarnation = incarnation
        self.diverged_at = diverged_at
        where = "at an unknown index" if diverged_at is None else f"from index {diverged_at} on"
        again = 0 if diverged_at is None else diverged_at
        super().__init__(
            f"run {run_id!r}: the store lost events this client already received: it holds "
            f"events up to {offset - 1} (incarnation {incarnation!r}), but the log's head is "
            f"now {next_offset} and its history differs {where}. Discard the events held from "
            f"index {again} on and read the run again from there "
            f"(events(from_offset={again}))"
        )

    def __reduce__(self) -> tuple[type[LogRolledBack], tuple[str, int, int, str, int | None]]:
        return (
            type(self),
            (self.run_id, self.offset, self.next_offset, self.incarnation, self.diverged_at),
        )


def error_info(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]] | None:
    """The reason and metadata of the ``google.rpc.ErrorInfo`` in a failed call's status
    details (the ``grpc-status-details-bin`` trailer), or None if it has none."""
    for key, value in error.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a malformed trailer is no ErrorInfo
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason), dict(info.metadata)
    return None


def log_rolled_back(
    error: grpc.aio.AioRpcError, run_id: str | None, offset: int, incarnation: str
) -> LogRolledBack | None:
    """``error`` as a LogRolledBack if it is FAILED_PRECONDITION with reason LOG_ROLLED_BACK,
    else None. Metadata the server left out falls back to what the client sent (``run_id``,
    ``offset``, ``incarnation``; the head to ``offset``)."""
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    info = error_info(error)
    if info is None or info[0] != "LOG_ROLLED_BACK":
        return None
    metadata = info[1]
    sent_offset = _int(metadata.get("offset"), offset)
    return LogRolledBack(
        run_id=metadata.get("run_id") or run_id or "",
        offset=sent_offset,
        next_offset=_int(metadata.get("next_offset"), sent_offset),
        incarnation=metadata.get("incarnation", incarnation),
        diverged_at=_int(metadata.get("diverged_at"), None),
    )


def _int(text: str | None, default: T) -> int | T:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
