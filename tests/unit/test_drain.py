"""Keel drains the model's stream itself (server/agents/drain.py), with real pydantic-ai
agents and FunctionModel standing in for the LLM."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from pydantic_ai import Agent, RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import (
    AgentStreamEvent,
    ModelMessage,
    ModelResponseStreamEvent,
    PartDeltaEvent,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from server.agents.drain import DrainStreams
from server.agents.loop import run_agent_loop
from server.agents.types import AgentSpec, RunInfo
from tests.sinks import ListSink
from tests.unit.test_agent_loop import MemoryCounters

DELTAS = 50


async def _deltas(_messages: list[ModelMessage], _info: AgentInfo) -> AsyncIterator[str]:
    for i in range(DELTAS):
        yield f"t{i} "


class CountsStreamEvents(AbstractCapability[Any]):
    """Counts the text deltas pydantic-ai's own event-stream machinery passes on."""

    def __init__(self) -> None:
        self.deltas = 0

    async def wrap_run_event_stream(
        self, ctx: RunContext[Any], *, stream: AsyncIterable[AgentStreamEvent]
    ) -> AsyncIterable[AgentStreamEvent]:
        async for event in stream:
            if isinstance(event, PartDeltaEvent):
                self.deltas += 1
            yield event


async def test_a_drained_request_hands_every_event_to_the_handler_and_none_to_the_stream() -> None:
    agent = Agent(FunctionModel(stream_function=_deltas))
    drain, counter = DrainStreams(), CountsStreamEvents()
    seen: list[ModelResponseStreamEvent] = []

    async def handler(event: ModelResponseStreamEvent) -> None:
        seen.append(event)

    drain.handler = handler
    streamed: list[AgentStreamEvent] = []
    async with agent.iter("go", capabilities=[counter, drain]) as run:
        async for node in run:
            if Agent.is_model_request_node(node):
                async with node.stream(run.ctx) as stream:
                    streamed.extend([event async for event in stream])
    assert run.result is not None
    # The run's output and history are those of the streamed response...
    assert run.result.output == "".join(f"t{i} " for i in range(DELTAS))
    # ...whose deltas reached the handler, one event each, and not pydantic-ai's stream.
    assert sum(isinstance(e, PartDeltaEvent) for e in seen) == DELTAS - 1  # the first is a start
    assert drain.drained == 1
    assert counter.deltas == 0
    assert not any(isinstance(e, PartDeltaEvent) for e in streamed)


async def test_without_a_handler_the_model_streams_as_usual() -> None:
    agent = Agent(FunctionModel(stream_function=_deltas))
    drain, counter = DrainStreams(), CountsStreamEvents()
    async with agent.iter("go", capabilities=[counter, drain]) as run:
        async for node in run:
            if Agent.is_model_request_node(node):
                async with node.stream(run.ctx) as stream:
                    async for _event in stream:
                        pass
    assert drain.drained == 0
    assert counter.deltas == DELTAS - 1


async def test_the_loop_emits_each_delta_once_whether_or_not_the_request_was_drained() -> None:
    agent = Agent(FunctionModel(stream_function=_deltas))
    spec = AgentSpec(agent)
    info = RunInfo(run_id="run-1", counters=MemoryCounters())
    drained = ListSink()
    await run_agent_loop(spec, "go", run_info=info, sink=drained)
    # An override replaces the model; the drain wraps the override's just the same.
    with agent.override(model=FunctionModel(stream_function=_deltas)):
        overridden = ListSink()
        await run_agent_loop(spec, "go", run_info=info, sink=overridden)
    for sink in (drained, overridden):
        deltas = [e.text_delta.delta for e in sink.events if e.HasField("text_delta")]
        assert "".join(deltas) == "".join(f"t{i} " for i in range(DELTAS))
        assert len(deltas) == DELTAS
