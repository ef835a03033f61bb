"""The run's event writer: assigns indices and commits events to the log in batches.

Group commit: `emit` only stamps and queues an event; a flusher task appends
whatever has queued up in one call (one Lua script on Redis) and, while that
call is in flight, the next batch gathers. A writer that flushed (or
committed) less than `linger_s` ago waits `linger_s` before its next flush,
so under a fast producer batches grow to about rate x linger, and a short
run's events ride along with its next checkpoint or its terminal event; a
slow producer's events are flushed at once, one round trip each, with no
added latency.

The writer is the run's only writer: the epoch it carries fences it out if
another instance takes the run over, and the log rejects any batch that does
not start at the run's next index, so no index is ever skipped or reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import replace

from keel.v1.agent_service_pb2 import AgentEvent

from server import metrics
from server.agents.checkpoint import Checkpoint
from server.events.log import EventLog, RunState


class EventWriter:
    """Implements the agent loop's EventSink for one run, at one epoch."""

    def __init__(
        self,
        log: EventLog,
        run_id: str,
        *,
        epoch: int,
        next_index: int,
        batch_max: int = 1000,
        pending_max: int = 5000,
        linger_s: float = 0.0,
        task_mark: int = 0,
        agent_id: str = "",
    ) -> None:
        self._log = log
        self._agent_id = agent_id  # the run's, for metrics
        # How many of the run's task log entries have become events (emit_task);
        # every checkpoint records it, so a takeover goes on from the right entry.
        self.task_mark = task_mark
        self._run_id = run_id
        self._epoch = epoch
        self._next_index = next_index  # index the next emitted event gets
        self._batch_max = batch_max
        self._pending_max = pending_max
        self._pending: list[AgentEvent] = []
        self._wakeup = asyncio.Event()  # set when events are pending
        self._drained = asyncio.Event()  # set when nothing is pending or in flight
        self._drained.set()
        self._lock = asyncio.Lock()  # one append in flight, taken in order
        self._failure: BaseException | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._linger_s = linger_s
        self._last_flush = -math.inf  # time.monotonic() when the last flush ended
        # The step and attempt of the last event emitted in a step: events from
        # outside the loop (TaskUpdates) are stamped with them, so they belong to
        # the attempt they were written during (and are superseded with it).
        self.step = 0
        self.attempt = 0

    @property
    def next_index(self) -> int:
        return self._next_index

    async def emit(self, event: AgentEvent) -> None:
        """Stamp `event` with run id, index and time and queue it for the log."""
        self._raise_if_failed()
        self._stamp(event)
        self._pending.append(event)
        self._drained.clear()
        self._wakeup.set()
        if self._flusher is None:
            self._flusher = asyncio.create_task(
                self._flush_forever(), name=f"writer:{self._run_id}"
            )
        if len(self._pending) >= self._pending_max:
            await self._drained.wait()  # backpressure: let the log catch up
            self._raise_if_failed()

    async def emit_task(self, event: AgentEvent) -> None:
        """Emit the event of the run's next task log entry (see task_mark)."""
        self.task_mark += 1
        await self.emit(event)

    async def commit(
        self,
        state: RunState | None = None,
        *,
        error: str = "",
        events: Sequence[AgentEvent] = (),
        checkpoint: Checkpoint | None = None,
        thread_messages: Sequence[bytes] = (),
        goal_progress: str | None = None,
    ) -> None:
        """Commit what was emitted, then `events`, with `state` and `checkpoint`, atomically.

        `thread_messages` go to the run's thread with a terminal `state`, and
        `goal_progress` to the run's record (EventLog.append).

        `events` join the same append (the flusher never sees them), so they
        become visible together with the state and the checkpoint: how a
        terminal event lands with its state, and a suspension is persisted
        before it is announced. The checkpoint is stamped with the index of
        the first event after this append.

        Cancel-safe: a commit cancelled mid-append still finishes that append
        before the CancelledError propagates, so the writer always knows which
        indices are committed (a half-known write would make the next append
        guess its index).
        """
        async with self._lock:
            self._raise_if_failed()
            for event in events:
                self._stamp(event)
            batch, self._pending = [*self._pending, *events], []
            encoded = (
                None
                if checkpoint is None
                else replace(
                    checkpoint, next_index=self._next_index, task_mark=self.task_mark
                ).encode()
            )
            append = asyncio.ensure_future(
                self._append(
                    batch,
                    state=state,
                    error=error,
                    checkpoint=encoded,
                    thread_messages=thread_messages,
                    goal_progress=goal_progress,
                )
            )
            try:
                await asyncio.shield(append)
            except asyncio.CancelledError:
                await append
                raise
            finally:
                self._drained.set()
            # A commit is a flush: events emitted right after it linger like those
            # after any flush, so a run that commits again soon (a short step's
            # checkpoint, the terminal event) takes them along in that append.
            self._last_flush = time.monotonic()

    def _stamp(self, event: AgentEvent) -> None:
        if event.step:
            self.step, self.attempt = event.step, event.attempt
        event.run_id = self._run_id
        event.index = self._next_index
        event.time.FromNanoseconds(time.time_ns())
        self._next_index += 1

    async def close(self) -> None:
        """Stop the flusher. Uncommitted events are dropped (call commit first to keep them)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            if time.monotonic() - self._last_flush < self._linger_s:
                # Busy: events keep coming. Let this batch gather for a moment,
                # so the log, the observers and the wire see one batch instead
                # of many single events. An idle writer flushes at once.
                await asyncio.sleep(self._linger_s)
            async with self._lock:
                self._wakeup.clear()
                batch = self._pending[: self._batch_max]
                del self._pending[: self._batch_max]
                try:
                    await self._append(batch)
                except Exception as exc:  # surfaced to the run by the next emit or commit
                    self._failure = exc
                    self._pending.clear()
                    self._drained.set()
                    return
                if self._pending:
                    self._wakeup.set()  # more came during the append: go round again
                else:
                    self._drained.set()
                self._last_flush = time.monotonic()

    async def _append(
        self,
        batch: Sequence[AgentEvent],
        *,
        state: RunState | None = None,
        error: str = "",
        checkpoint: bytes | None = None,
        thread_messages: Sequence[bytes] = (),
        goal_progress: str | None = None,
    ) -> None:
        if batch or state is not None or checkpoint is not None or goal_progress is not None:
            await self._log.append(
                self._run_id,
                self._epoch,
                batch,
                state=state,
                error=error,
                checkpoint=checkpoint,
                thread_messages=thread_messages,
                goal_progress=goal_progress,
            )
            if batch:
                metrics.EVENTS_APPENDED.inc(len(batch))
                metrics.APPEND_BATCH.observe(len(batch))
            if state is not None and state.terminal:
                metrics.RUNS_ENDED.labels(self._agent_id, state.value).inc()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure
