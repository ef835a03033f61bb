"""The one capability a run's agent loop gets from Keel: tool journal, background tools
and the drained model stream together.

pydantic-ai pays for every capability of a run on every hook it dispatches,
whether the capability implements the hook or not, so the run's three
concerns share one capability: a tool call goes through the journal
(server/runs/journal.py: a journaled result is returned without running the
tool), then through the background tools (server/tasks/capability.py: a
background tool becomes a task); the model's streams are drained as
DrainStreams does (server/agents/drain.py).
"""

from __future__ import annotations

from typing import Any

from pydantic_ai import RunContext
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolDefinition

from server.agents.drain import DrainStreams
from server.runs.journal import ToolJournal
from server.tasks.capability import BackgroundTools


class RunCapability(DrainStreams):
    """A run's journal and background tools, and its drained model streams."""

    def __init__(self, journal: ToolJournal, background: BackgroundTools) -> None:
        super().__init__()
        self._journal = journal
        self._background = background

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: Any,
        handler: Any,
    ) -> Any:
        async def in_background(args: Any) -> Any:
            return await self._background.wrap_tool_execute(
                ctx, call=call, tool_def=tool_def, args=args, handler=handler
            )

        return await self._journal.wrap_tool_execute(
            ctx, call=call, tool_def=tool_def, args=args, handler=in_background
        )
