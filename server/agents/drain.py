"""The model stream, drained by Keel: one hop per streamed event instead of a dozen.

pydantic-ai hands a streamed model response to its consumer through a chain
of async generators, three anyio locks (each a trip round the event loop
even when nobody contends for it) and the capabilities' event-stream hooks:
on a fast stream that chain, not the model or Keel, is where most of a
run's CPU goes. Durable execution does not need it for the deltas: Keel
writes every delta to its event log itself.

DrainStreams is a capability Keel gives every run: through pydantic-ai's
get_wrapper_model hook it wraps whichever model serves each request (the
agent's, an override's, a fallback's) in a DrainedModel, which consumes the
model's stream inside the request, the way pydantic-ai's own
durable-execution integrations do, giving every event to the capability's
`handler` (the loop maps it to Keel events and emits them as they arrive),
and hands pydantic-ai the finished response as a CompletedStreamedResponse.
The run handles that response exactly as it would the streamed one: same
message history, usage and output. pydantic-ai's own per-event machinery
(a capability's wrap_run_event_stream or on_event, partial output
validation, mid-stream token limits) sees the finished response, not its
deltas.

A request made while no handler is set (none is, outside the loop's model
half) streams as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage, ModelResponseStreamEvent
from pydantic_ai.models import (
    CompletedStreamedResponse,
    Model,
    ModelRequestParameters,
    StreamedResponse,
)
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings

EventHandler = Callable[[ModelResponseStreamEvent], Awaitable[None]]

# A model that streams faster than the loop turns would otherwise keep the loop
# for its whole response: yield to it every this many events, so the run's
# writer flushes and other runs stream meanwhile.
YIELD_EVERY_EVENTS = 64


class DrainStreams(AbstractCapability[Any]):
    """Drains the model streams of one run into `handler` (module docstring)."""

    def __init__(self) -> None:
        self.handler: EventHandler | None = None  # set by the loop for its model halves
        self.drained = 0  # streamed responses drained so far

    def get_wrapper_model(self, model: Model) -> Model | None:
        return DrainedModel(model, self)


class DrainedModel(WrapperModel):
    """`wrapped`, its streams drained into `owner.handler` while one is set."""

    def __init__(self, wrapped: Model, owner: DrainStreams) -> None:
        super().__init__(wrapped)
        self._owner = owner

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        handler = self._owner.handler
        async with self.wrapped.request_stream(
            messages, model_settings, model_request_parameters, run_context
        ) as stream:
            if handler is None:  # nobody to drain into: stream as usual
                yield stream
                return
            count = 0
            async for event in stream:
                await handler(event)
                count += 1
                if count % YIELD_EVERY_EVENTS == 0:
                    await asyncio.sleep(0)
            response = stream.get()
        self._owner.drained += 1
        yield CompletedStreamedResponse(response, model_request_parameters=model_request_parameters)
