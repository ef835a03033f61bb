"""Loading the agents a server runs, and describing them for ListAgents.

A registry is named on the command line as "module:attribute" (for example
`--agents server.agents.testing:registry`), where the attribute is a mapping
from agent id to either a pydantic-ai Agent or an AgentSpec. Plain Agents are
wrapped in an AgentSpec that takes no deps.

Loading happens once at startup, so every problem is a ValueError with a
message fit for the operator who typed the flag.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic_ai import Agent
from pydantic_ai.models import Model
from pydantic_ai.toolsets import AbstractToolset, FunctionToolset

from server.agents.types import AgentSpec
from server.tasks.records import background_options

# Agent ids travel in requests, logs and Redis keys: keep them plain.
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class ToolDescription:
    """One tool an agent can call, as ListAgents shows it."""

    name: str
    description: str
    requires_approval: bool
    background: bool = False  # runs as a background task (server/tasks)


class AgentDescription(NamedTuple):
    """What ListAgents says about an agent beyond its id and spec.description.

    A named tuple so callers can write `model_name, tools = describe(spec)`.
    """

    model_name: str
    tools: tuple[ToolDescription, ...]


def load_registry(spec: str) -> dict[str, AgentSpec]:
    """Import "module:attribute" and return its agents as AgentSpecs, by agent id."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"agents registry {spec!r} must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure; BaseException (cancel, exit) passes
        raise ValueError(
            f"agents registry {spec!r}: cannot import module {module_name!r}: {error}"
        ) from error

    target: Any = module
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise ValueError(
                f"agents registry {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        target = getattr(target, name)
    if not isinstance(target, Mapping):
        raise ValueError(
            f"agents registry {spec!r}: {attribute!r} is a {type(target).__name__}, "
            "not a mapping of agent id to Agent or AgentSpec"
        )

    registry: dict[str, AgentSpec] = {}
    for agent_id, entry in target.items():
        if not isinstance(agent_id, str) or not _AGENT_ID.fullmatch(agent_id):
            raise ValueError(
                f"agents registry {spec!r}: agent id {agent_id!r} must be 1-64 letters, digits, "
                "'_', '.' or '-', starting with a letter or digit"
            )
        agent = as_spec(entry, where=f"agents registry {spec!r}, agent {agent_id!r}")
        try:
            function_tools(agent.agent)  # checks the background tools too
        except ValueError as error:
            raise ValueError(f"agents registry {spec!r}, agent {agent_id!r}: {error}") from None
        registry[agent_id] = agent
    return registry


def as_spec(entry: object, *, where: str = "agent") -> AgentSpec:
    """An AgentSpec as is, or a plain Agent wrapped in one."""
    if isinstance(entry, AgentSpec):
        return entry
    if isinstance(entry, Agent):
        return AgentSpec(
            agent=entry,
            description=entry.description or entry.name or "",
            approval_tools=frozenset(t.name for t in function_tools(entry) if t.requires_approval),
        )
    raise ValueError(
        f"{where}: expected a pydantic_ai.Agent or an AgentSpec, got {type(entry).__name__}"
    )


def describe(spec: AgentSpec) -> AgentDescription:
    """The model name and tools of an agent, for ListAgents."""
    return AgentDescription(
        model_name=model_name(spec.agent.model),
        tools=tuple(function_tools(spec.agent)),
    )


def model_name(model: Model | str | None) -> str:
    """A model as "provider:name", the way pydantic-ai's model strings spell it."""
    if model is None:
        return ""
    if isinstance(model, str):
        return model
    # Looked up, not imported: importing the OpenAI SDK costs tens of MB in every server
    # process, and a model of that class exists only if a registry imported it already.
    openai_models = sys.modules.get("pydantic_ai.models.openai")
    if openai_models is not None and isinstance(model, openai_models.OpenAIChatModel):
        # model_id says "openai:", which in a model string means the Responses API.
        return f"openai-chat:{model.model_name}"
    return model.model_id


def function_tools(agent: Agent[Any, Any]) -> list[ToolDescription]:
    """The function tools registered on an agent, sorted by name.

    Toolsets that list their tools only at run time (MCP servers, dynamic
    toolsets) cannot be described statically and are left out, as are the
    output tools pydantic-ai adds for structured output.
    """
    found: dict[str, ToolDescription] = {}

    def visit(toolset: AbstractToolset[Any]) -> None:
        if isinstance(toolset, FunctionToolset):
            for tool in toolset.tools.values():
                found[tool.name] = ToolDescription(
                    name=tool.name,
                    description=tool.description or "",
                    requires_approval=tool.requires_approval,
                    background=background_options(tool.metadata) is not None,
                )
                if found[tool.name].background and tool.takes_ctx:
                    raise ValueError(
                        f"background tool {tool.name!r} takes a RunContext; a background "
                        "tool runs outside the agent loop: use server.tasks.task_context()"
                    )

    for toolset in agent.toolsets:
        toolset.apply(visit)
    return [found[name] for name in sorted(found)]
