"""RunHandle: one run's event stream, resumed across dropped connections.

A handle remembers where its reader is (``next_offset``: the index of the
next event it has not yielded), once the first snapshot named it, the run's
id, and the incarnation of the store that wrote the events it holds. Every
reconnect asks for exactly that offset, so the events a reader sees are 0, 1,
2, ... exactly once, whatever happened in between; and it sends that
incarnation, so a store that came back with an older state (and now gives
some of those indices to other events) fails the reconnect with
LogRolledBack instead of mixing two histories.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from keel.v1 import agent_service_pb2 as pb

from keel_client import decisions
from keel_client.backoff import Backoff
from keel_client.errors import LogRolledBack as LogRolledBack  # re-exported
from keel_client.errors import StreamContractError as StreamContractError  # re-exported
from keel_client.errors import log_rolled_back

if TYPE_CHECKING:
    from typing import TypeAlias

    from keel.v1.agent_service_pb2_grpc import AgentServiceAsyncStub

    _Call: TypeAlias = (
        grpc.aio.UnaryStreamCall[pb.StreamRequest, pb.StreamResponse]
        | grpc.aio.UnaryStreamCall[pb.ObserveRequest, pb.ObserveResponse]
    )

_Response = pb.StreamResponse | pb.ObserveResponse


@dataclass(frozen=True, slots=True)
class Reconnect:
    """One reconnect of a handle after its stream failed with UNAVAILABLE."""

    attempt: int  # 1 for the first reconnect of a row without a new event
    offset: int  # the offset the new request resumes at (the handle's next_offset)
    rpc: str  # "Observe", or "Stream" when the run's id was not known yet
    delay_s: float  # how long the handle waits before sending it
    details: str  # the status details of the error that caused it


OnReconnect = Callable[[Reconnect], None]


class RunHandle:
    """A run's event stream that survives dropped connections.

    Get one from ``KeelClient.stream()`` (starts a run) or ``KeelClient.run()``
    (an existing run) and iterate ``events()``. Attributes:

    - ``run_id``: the run's id; for ``stream()`` it is None until the first
      snapshot arrives, so a Stream that drops before it is sent again with
      the same request_id (idempotent: the server attaches to the same run).
    - ``next_offset``: the index of the next event ``events()`` will yield,
      that is the last yielded index + 1.
    - ``snapshot``: the RunSnapshot of the latest (re)connection.
    - ``last_heartbeat``: the latest Heartbeat, whose next_offset the handle
      checks against its own.
    - ``incarnation`` (read-only): the incarnation of the store that wrote
      the events the handle holds, as the stream said: the snapshot's
      ``run.incarnation``, replaced by a later heartbeat's (one at the
      handle's next_offset) when the store changed. Sent with every
      reconnect (``ObserveRequest.incarnation``) once the handle holds an
      event; "" until the first snapshot, and for a store that never goes back.
    - ``reconnects``: every reconnect so far; ``on_reconnect`` is also called
      with each one as it happens.

    ``approve``, ``deny`` and ``answer`` decide a pending tool call of the
    run (see ``keel_client.decisions``); call them from inside the ``events()``
    loop when a ``tool_call_approval`` or ``tool_call_suspended`` event
    arrives, and the loop goes on with the resumed run.
    """

    def __init__(
        self,
        stub: Callable[[], AgentServiceAsyncStub],
        *,
        backoff: Backoff,
        max_reconnects: int | None,
        run_id: str | None = None,
        start: pb.StreamRequest | None = None,
        on_reconnect: OnReconnect | None = None,
        stop_at_suspend: bool = False,
    ) -> None:
        if (run_id is None) == (start is None):
            raise ValueError("a RunHandle needs exactly one of run_id and start")
        if stop_at_suspend and start is not None:
            raise ValueError("stop_at_suspend is an option of Observe: use it on a run's handle")
        self.stop_at_suspend = stop_at_suspend
        self.run_id = run_id
        self.next_offset = 0
        self.snapshot: pb.RunSnapshot | None = None
        self.last_heartbeat: pb.Heartbeat | None = None
        self.reconnects: list[Reconnect] = []
        self.on_reconnect = on_reconnect
        self._stub = stub
        self._start = start
        self._backoff = backoff
        self._max_reconnects = max_reconnects
        self._iterating = False
        self._call_has_snapshot = False
        self._incarnation = ""

    @property
    def incarnation(self) -> str:
        """The incarnation of the store that wrote the events this handle holds ("" if
        unknown): what its reconnects send, so the server can tell they are still the log's."""
        return self._incarnation

    async def events(self, from_offset: int | None = None) -> AsyncGenerator[pb.AgentEvent, None]:
        """Yield the run's events from ``from_offset`` (default: ``next_offset``,
        0 on a new handle) exactly once and in index order, following the run
        live, until the server ends the stream with OK after the terminal event.

        Lazy: no request is sent until the first iteration. Close it (break out
        of ``async with contextlib.aclosing(...)``) to drop the connection; the
        run goes on in the server and ``events()`` may be iterated again later.

        A ``from_offset`` past ``next_offset`` forgets the handle's
        ``incarnation``: the handle holds no event just below it, so it claims
        nothing there (the next snapshot tells the incarnation again). One at
        or below ``next_offset`` keeps it: the handle does hold the events below
        it, written in the history that incarnation names, so re-reading from
        there still checks they are the log's (and re-reading from the
        ``diverged_at`` of a LogRolledBack, or from 0, passes that check).

        1. Open Observe(run_id, next_offset, incarnation), or Stream(request)
           while the run's id is unknown (then drop the replayed events below
           next_offset).
        2. Check the snapshot comes first; take the run's id and incarnation
           from it (and a new incarnation from a heartbeat at next_offset).
        3. For each event: index < next_offset is a duplicate (drop it);
           index > next_offset is a gap (raise StreamContractError); otherwise
           advance next_offset and yield it.
        4. On UNAVAILABLE wait (capped exponential backoff with jitter) and go
           to 1. Give up, re-raising it, after ``max_reconnects`` reconnects in
           a row that brought no new event. FAILED_PRECONDITION with reason
           LOG_ROLLED_BACK raises LogRolledBack (the store lost events the
           handle holds; never retried). Any other status is raised as is.
        """
        if self._iterating:
            raise RuntimeError("this RunHandle's events() is already being iterated")
        if from_offset is not None and from_offset < 0:
            raise ValueError(f"from_offset must not be negative, got {from_offset}")
        self._iterating = True
        try:
            if from_offset is not None:
                if from_offset > self.next_offset:
                    self._incarnation = ""  # no claim about events the handle never held
                self.next_offset = from_offset
            failures = 0  # reconnects in a row that brought no new event
            while True:
                offset_before = self.next_offset
                call = self._open()
                try:
                    async for message in call:
                        for event in self._accept(message):
                            yield event
                    return
                except grpc.aio.AioRpcError as error:
                    failures = 0 if self.next_offset > offset_before else failures
                    reconnect = self._reconnect_or_raise(error, failures)
                    failures += 1
                finally:
                    call.cancel()
                self.reconnects.append(reconnect)
                if self.on_reconnect is not None:
                    self.on_reconnect(reconnect)
                await asyncio.sleep(reconnect.delay_s)
        finally:
            self._iterating = False

    def _open(self) -> _Call:
        """Step 1 of events()."""
        self._call_has_snapshot = False
        stub = self._stub()
        if self.run_id is None:
            assert self._start is not None  # __init__ requires run_id or start
            return stub.Stream(self._start)
        request = pb.ObserveRequest(
            run_id=self.run_id,
            offset=self.next_offset,
            stop_at_suspend=self.stop_at_suspend,
            incarnation=self._claimed_incarnation(),
        )
        return stub.Observe(request)

    def _claimed_incarnation(self) -> str:
        """The incarnation of the last event the handle holds, index next_offset - 1; ""
        (no check) while it holds none."""
        return self._incarnation if self.next_offset > 0 else ""

    def _accept(self, message: _Response) -> Iterator[pb.AgentEvent]:
        """Steps 2 and 3 of events() for one message: the new events it holds."""
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            self._take_snapshot(message.snapshot)
            self._call_has_snapshot = True
        elif not self._call_has_snapshot:
            raise StreamContractError(f"the stream sent {kind!r} before its snapshot")
        elif kind == "events":
            for event in message.events.events:
                if event.index < self.next_offset:
                    continue  # a duplicate, already yielded before a reconnect
                if event.index > self.next_offset:
                    raise StreamContractError(
                        f"run {self.run_id}: expected event {self.next_offset}, got {event.index}"
                    )
                self.next_offset += 1  # before yielding: a reader may stop at this event
                yield event
        elif kind == "heartbeat":
            self.last_heartbeat = message.heartbeat
            # A heartbeat names the next index this stream delivers; past ours
            # means the stream skipped events this handle never saw.
            if message.heartbeat.next_offset > self.next_offset:
                raise StreamContractError(
                    f"run {self.run_id}: heartbeat at {message.heartbeat.next_offset} "
                    f"but next_offset is {self.next_offset}"
                )
            # The incarnation that wrote the events delivered so far: the
            # handle's, once the stream has delivered all the handle holds.
            if message.heartbeat.incarnation and message.heartbeat.next_offset == self.next_offset:
                self._incarnation = message.heartbeat.incarnation

    def _reconnect_or_raise(self, error: grpc.aio.AioRpcError, failures: int) -> Reconnect:
        """Step 4 of events(): the reconnect to make, or re-raise ``error``."""
        rolled_back = log_rolled_back(
            error, self.run_id, self.next_offset, self._claimed_incarnation()
        )
        if rolled_back is not None:
            raise rolled_back from error
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise error
        if self._max_reconnects is not None and failures >= self._max_reconnects:
            raise error
        return Reconnect(
            attempt=failures + 1,
            offset=self.next_offset,
            rpc="Stream" if self.run_id is None else "Observe",
            delay_s=self._backoff.delay_s(failures),
            details=error.details() or "",
        )

    def _take_snapshot(self, snapshot: pb.RunSnapshot) -> None:
        run_id = snapshot.run.run_id
        if self.run_id is not None and run_id != self.run_id:
            raise StreamContractError(f"expected a snapshot of run {self.run_id}, got {run_id}")
        self.run_id = run_id
        self.snapshot = snapshot
        # The incarnation that wrote the run's latest events: the history the
        # events this stream delivers (and those the handle holds, which the
        # server checked when the stream opened) belong to.
        self._incarnation = snapshot.run.incarnation

    # Decisions for the run's pending tool calls.

    async def approve(
        self,
        tool_call_id: str,
        *,
        override_args: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> pb.RunSnapshot:
        """Approve a tool call that waits for approval; ``override_args`` (a JSON
        object) replaces the arguments the model chose. Returns the snapshot the
        server sends once it has the decision."""
        return await self._decide(decisions.approval(tool_call_id, override_args), request_id)

    async def deny(
        self, tool_call_id: str, message: str = "", *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Deny a tool call that waits for approval; the model sees ``message``."""
        return await self._decide(decisions.denial(tool_call_id, message), request_id)

    async def answer(
        self, tool_call_id: str, result: Any, *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Give the result (any JSON value) of a deferred tool call."""
        return await self._decide(decisions.answer(tool_call_id, result), request_id)

    async def _decide(self, decision: pb.Decision, request_id: str | None) -> pb.RunSnapshot:
        if self.run_id is None:
            raise RuntimeError("the run's id is not known yet: iterate events() first")
        return await decisions.deliver(
            self._stub,
            self.run_id,
            [decision],
            request_id=request_id,
            backoff=self._backoff,
            max_reconnects=self._max_reconnects,
        )
