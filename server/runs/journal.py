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
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pydantic_core
from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolDefinition

from server.events.log import EventLog

log = logging.getLogger(__name__)


class ToolJournal(AbstractCapability[Any]):
    """Journals the tool results of one run, written by the owner at `epoch`."""

    def __init__(self, event_log: EventLog, run_id: str, epoch: int) -> None:
        self._log = event_log
        self._run_id = run_id
        self._epoch = epoch

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
        result = await handler(args)
        try:
            encoded = pydantic_core.to_json(result)
        except pydantic_core.PydanticSerializationError:
            log.warning("tool %s returned a result that cannot be journaled", call.tool_name)
            return result
        await self._log.journal_tool(self._run_id, self._epoch, call.tool_call_id, encoded)
        return result
