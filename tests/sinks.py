"""An in-memory EventSink for tests of the agent loop."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from server.agents.checkpoint import Checkpoint


class ListSink:
    """An EventSink that keeps every event in memory."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.checkpoints: list[Checkpoint] = []
        self.boundaries = 0

    async def emit(self, event: Any) -> None:
        self.events.append(event)

    async def checkpoint(self, checkpoint: Checkpoint) -> None:
        self.checkpoints.append(replace(checkpoint, next_index=len(self.events)))

    async def at_boundary(self) -> None:
        self.boundaries += 1

    def kinds(self) -> list[str]:
        return [event.WhichOneof("payload") for event in self.events]

    def payloads(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("payload") == kind]

    def text(self) -> str:
        return "".join(p.delta for p in self.payloads("text_delta"))
