"""Loading agent registries from "module:attribute" and describing agents for ListAgents."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel

from server.agents.registry import describe, load_registry
from server.agents.types import AgentSpec


def install_module(monkeypatch: pytest.MonkeyPatch, **attributes: Any) -> str:
    module = types.ModuleType("keel_test_agents")
    for name, value in attributes.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def build_agent() -> Agent[None, str]:
    agent: Agent[None, str] = Agent(TestModel(), name="helper", description="Helps.")

    @agent.tool_plain
    def lookup(query: str) -> str:
        """Look something up."""
        return query

    @agent.tool_plain(requires_approval=True)
    def delete(path: str) -> str:
        """Delete a file."""
        return path

    return agent


def test_the_scripted_registry_loads() -> None:
    registry = load_registry("server.agents.testing:registry")
    assert list(registry) == ["scripted", "scripted-judge"]
    described = describe(registry["scripted"])
    assert described.model_name == "function:scripted"
    assert [(t.name, t.requires_approval, t.background) for t in described.tools] == [
        ("approve_me", True, False),
        ("fail", False, False),
        ("record", False, False),
        ("slow", False, True),
        ("slow_reject", False, True),
    ]
    assert all(t.description for t in described.tools)


def test_plain_agents_are_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = build_agent()
    anonymous: Agent[None, str] = Agent(TestModel())
    module = install_module(monkeypatch, agents={"helper": agent, "anon": anonymous})

    registry = load_registry(f"{module}:agents")

    helper = registry["helper"]
    assert helper.agent is agent
    assert helper.description == "Helps."
    assert helper.deps is None
    assert helper.approval_tools == frozenset({"delete"})
    assert registry["anon"].description == ""


def test_agent_specs_are_kept_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = AgentSpec(agent=build_agent(), description="custom", deps=lambda info: info)
    module = install_module(monkeypatch, nested=types.SimpleNamespace(agents={"a": spec}))
    assert load_registry(f"{module}:nested.agents") == {"a": spec}


def test_describe_lists_function_tools_and_the_model() -> None:
    model_name, tools = describe(AgentSpec(agent=build_agent()))
    assert model_name == "test:test"
    assert [(t.name, t.description, t.requires_approval) for t in tools] == [
        ("delete", "Delete a file.", True),
        ("lookup", "Look something up.", False),
    ]


def test_describe_an_agent_without_a_model() -> None:
    assert describe(AgentSpec(agent=Agent())).model_name == ""


@pytest.mark.parametrize(
    ("spec", "attributes", "message"),
    [
        ("no_colon", {}, "must look like 'package.module:attribute'"),
        (":registry", {}, "must look like"),
        ("keel_test_agents:", {}, "must look like"),
        ("keel_no_such_module_xyz:registry", {}, "cannot import module"),
        ("keel_test_agents:missing", {}, "has no attribute 'missing'"),
        ("keel_test_agents:agents", {"agents": [1, 2]}, "is a list, not a mapping"),
        ("keel_test_agents:agents", {"agents": {"a": "gpt-4o"}}, "got str"),
        ("keel_test_agents:agents", {"agents": {"bad id": Agent()}}, "agent id 'bad id'"),
        ("keel_test_agents:agents", {"agents": {"": Agent()}}, "agent id ''"),
        ("keel_test_agents:agents", {"agents": {7: Agent()}}, "agent id 7"),
    ],
)
def test_bad_registries_fail_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, spec: str, attributes: dict[str, Any], message: str
) -> None:
    install_module(monkeypatch, **attributes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as caught:
        load_registry(spec)
    assert repr(spec) in str(caught.value)


def test_import_errors_name_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> Any:
        raise RuntimeError("missing OPENAI_API_KEY")

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(ValueError, match=r"cannot import module 'x'.*missing OPENAI_API_KEY"):
        load_registry("x:registry")


def test_a_background_tool_that_takes_a_run_context_is_refused_at_load() -> None:
    with pytest.raises(
        ValueError, match="background tool '_fetch_with_context' takes a RunContext"
    ):
        load_registry("tests.registries:background_with_context")
