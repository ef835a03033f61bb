"""The tool journal: a finished tool call is never executed again.

A pydantic-ai capability around every tool execution of a run:

1. if the log holds a result for (run_id, tool_call_id), return it without
   calling the tool (a step re-run after a takeover reuses it);
2. otherwise call the tool and journal its result the moment it returns,
   before the step's checkpoint, fenced by the owner's epoch.

A tool interrupted while running (its process died before step 2 finished)
runs again after the takeover: at least once for that case. That is why
tools get a stable idempotency key (RunInfo.idempotency_key).

Results are journaled as JSON, so a reused result reaches the model as the
JSON value of what the tool returned (a pydantic model comes back as a dict).
A result that cannot be serialized is not journaled (that tool is then at
least once) and a warning is logged.

While a tool runs, `current_call()` gives it its JournaledCall: the call's
run and tool call ids, and

- `note(value)` / `noted()`: one value per tool call kept in the same
  journal (under "<tool_call_id>#note", first write wins, fenced by the
  owner's epoch like the result), so a tool interrupted by its process's
  death finds, when its call runs again after the takeover, what its first
  run noted: the id of the remote work it started, say, to follow that work
  instead of starting it again (server/a2a/remote.py does this);
- `output(value)`: a ToolOutput event in the run's stream (intermediate
  output of the running tool, as JSON), stamped with the step and attempt of
  the call. Like the call's other events, the outputs of an attempt that
  a takeover superseded are superseded with it, and the call's re-run emits
  its own.

Outside a Keel run (an agent run by hand, a test) there is no current call.
"""

from __future__ import annotations

import contextvars
import json
import logging
from dataclasses import dataclass
from typing import Any

import pydantic_core
from keel.v1 import agent_service_pb2 as pb
from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolDefinition

from server.events.log import EventLog
from server.runs.writer import EventWriter

log = logging.getLogger(__name__)

NOTE_SUFFIX = "#note"  # a call's note is journaled under its tool call id + this

_current: contextvars.ContextVar[JournaledCall | None] = contextvars.ContextVar(
    "keel_journaled_call", default=None
)


@dataclass(frozen=True, slots=True)
class JournaledCall:
    """The tool call running now, as the journal knows it (see the module docstring)."""

    run_id: str
    tool_call_id: str
    _log: EventLog
    _epoch: int
    _writer: EventWriter | None

    async def noted(self) -> bytes | None:
        """What an earlier run of this call noted, or None."""
        return await self._log.journaled_tool(self.run_id, self.tool_call_id + NOTE_SUFFIX)

    async def note(self, value: bytes) -> None:
        """Keep `value` for a re-run of this call; the first note of a call is kept, later
        ones are ignored. Raises StaleEpoch when another instance owns the run now."""
        await self._log.journal_tool(
            self.run_id, self._epoch, self.tool_call_id + NOTE_SUFFIX, value
        )

    async def output(self, value: Any) -> None:
        """Emit `value` (anything pydantic can serialise) as a ToolOutput event of this call;
        a no-op for a journal without a writer."""
        writer = self._writer
        if writer is None:
            return
        event = pb.AgentEvent(
            step=writer.step,
            attempt=writer.attempt,
            tool_output=pb.ToolOutput(
                tool_call_id=self.tool_call_id,
                output_json=pydantic_core.to_json(value).decode(),
            ),
        )
        await writer.emit(event)


def current_call() -> JournaledCall | None:
    """The journaled tool call this code runs in, or None outside a Keel run's tool call."""
    return _current.get()


class ToolJournal(AbstractCapability[Any]):
    """Journals the tool results of one run, written by the owner at `epoch`; with `writer`
    (the run's), a running tool's outputs become ToolOutput events."""

    def __init__(
        self, event_log: EventLog, run_id: str, epoch: int, writer: EventWriter | None = None
    ) -> None:
        self._log = event_log
        self._run_id = run_id
        self._epoch = epoch
        self._writer = writer

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: Any,
        handler: Any,
    ) -> Any:
        stored = await self._log.journaled_tool(self._run_id, call.tool_call_id)
        if stored is not None:
            return json.loads(stored)
        journaled = JournaledCall(
            self._run_id, call.tool_call_id, self._log, self._epoch, self._writer
        )
        token = _current.set(journaled)
        try:
            result = await handler(args)
        finally:
            _current.reset(token)
        try:
            encoded = pydantic_core.to_json(result)
        except pydantic_core.PydanticSerializationError:
            log.warning("tool %s returned a result that cannot be journaled", call.tool_name)
            return result
        await self._log.journal_tool(self._run_id, self._epoch, call.tool_call_id, encoded)
        return result
