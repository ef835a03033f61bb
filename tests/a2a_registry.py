"""A registry whose agent calls remote A2A agents (server/a2a/remote.py), for tests.

Serve it with `--agents tests.a2a_registry:registry` and the environment
variable REMOTE_URL_ENV set to the remote agent's URL (a Keel server's
`http://host:port/a2a/scripted`, say).

The agent `caller` has a scripted model whose input is JSON:

    {"calls": [{"tool": "ask_remote", "message": "..."}, {"tool": "wait", "ms": 3000}],
     "then_text": 20, "delay_ms": 50}

Its first response calls the tools of `calls`, all at once (ids "call_0",
"call_1", ...). Its second response streams `then_text` text deltas "a0 ",
"a1 ", ... (`delay_ms` apart) and answers with what the tools gave it, one
line per call in the order of `calls`: "<tool>: <result>" for a result
(JSON for anything but text) or "<tool> failed: <message>" when the tool
asked for a retry (it never calls again).

Tools: `ask_remote` (the remote agent at REMOTE_URL_ENV, with the API key
REMOTE_KEY_ENV if set), `ask_nowhere` (an
A2A agent at a port nothing listens on) and `wait` (sleeps `ms`).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field
from pydantic_ai import Agent, TextOutput, Tool
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    RetryPromptPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from server.a2a.remote import a2a_agent_tool
from server.agents.types import AgentSpec

REMOTE_URL_ENV = "KEEL_TEST_REMOTE_A2A_URL"
REMOTE_KEY_ENV = "KEEL_TEST_REMOTE_A2A_KEY"  # the remote's API key, if it has keys
NOWHERE = "http://127.0.0.1:9/a2a/nobody"  # the discard port: nothing answers there


class Call(BaseModel):
    tool: str
    message: str = ""
    ms: int = Field(default=0, ge=0, le=60_000)


class Plan(BaseModel):
    calls: list[Call] = Field(min_length=1, max_length=8)
    then_text: int = Field(default=0, ge=0, le=10_000)
    delay_ms: int = Field(default=0, ge=0, le=10_000)


def _plan(messages: list[ModelMessage]) -> Plan:
    for message in messages:
        for part in message.parts:
            if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                return Plan.model_validate_json(part.content)
    raise ValueError("the caller needs a user message holding its plan")


def _answer(plan: Plan, messages: list[ModelMessage]) -> str:
    """One line per call, from the tools' results (or retry prompts) in the history."""
    got: dict[str, str] = {}
    for message in messages:
        if not isinstance(message, ModelRequest):
            continue
        for part in message.parts:
            if isinstance(part, ToolReturnPart):
                content = part.content
                shown = content if isinstance(content, str) else json.dumps(content)
                failed = " failed" if part.outcome != "success" else ""
                got[part.tool_call_id] = f"{part.tool_name}{failed}: {shown}"
            elif isinstance(part, RetryPromptPart) and part.tool_call_id:
                content = part.content
                shown = content if isinstance(content, str) else json.dumps(content)
                got[part.tool_call_id] = f"{part.tool_name} failed: {shown}"
    return "\n".join(got.get(f"call_{n}", f"call_{n}: nothing") for n in range(len(plan.calls)))


async def _play(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | DeltaToolCalls]:
    plan = _plan(messages)
    responses = sum(1 for m in messages if not isinstance(m, ModelRequest))
    if responses == 0:
        for n, call in enumerate(plan.calls):
            args = {"message": call.message} if call.tool != "wait" else {"ms": call.ms}
            yield {n: DeltaToolCall(name=call.tool, tool_call_id=f"call_{n}")}
            yield {n: DeltaToolCall(json_args=json.dumps(args))}
        return
    for i in range(plan.then_text):
        if i and plan.delay_ms:
            await asyncio.sleep(plan.delay_ms / 1000)
        yield f"a{i} "
    yield "\n" + _answer(plan, messages)


async def _final(text: str) -> str:
    # The answer follows the streamed "aN " deltas and a newline.
    return text.split("\n", 1)[1] if "\n" in text else text


async def wait(ms: int) -> str:
    """Sleep `ms` milliseconds."""
    await asyncio.sleep(ms / 1000)
    return "waited"


def build_caller() -> Agent[None, str]:
    return Agent(
        FunctionModel(stream_function=_play, model_name="caller"),
        output_type=TextOutput(_final),
        name="caller",
        tools=[
            a2a_agent_tool(
                os.environ.get(REMOTE_URL_ENV, NOWHERE),
                name="ask_remote",
                description="Ask the remote scripted agent.",
                bearer_token=os.environ.get(REMOTE_KEY_ENV),
                max_retries=1,
            ),
            a2a_agent_tool(NOWHERE, name="ask_nowhere", max_retries=1),
            Tool(wait, takes_ctx=False),
        ],
    )


registry = {"caller": AgentSpec(agent=build_caller(), description="Calls remote A2A agents.")}
