"""Agent registries for tests: the scripted agent under the per-agent options of AgentSpec.

Serve them with `--agents tests.registries:options` (the repository root is
importable when tests run).
"""

from __future__ import annotations

import dataclasses

from pydantic_ai import Agent, RunContext, Tool

from server.agents.testing import registry as scripted
from server.goals import Goal
from server.tasks import background

BRIEF_RETENTION_S = 1.0

options = {
    "scripted": scripted["scripted"],
    # Live only: its events reach the streams open at the time and are not kept.
    "scripted-live": dataclasses.replace(scripted["scripted"], resumable=False),
    # Its ended runs are kept BRIEF_RETENTION_S, whatever the server's retention.
    "scripted-brief": dataclasses.replace(
        scripted["scripted"], ended_run_retention_s=BRIEF_RETENTION_S
    ),
    # At most one of its background tasks runs at a time, across every server.
    "scripted-one-task": dataclasses.replace(scripted["scripted"], max_concurrent_tasks=1),
    # Its runs pursue a goal unless their request sets another.
    "scripted-goal": dataclasses.replace(
        scripted["scripted"],
        default_goal=Goal("say DONE", judge_agent_id="scripted-judge", max_attempts=4),
    ),
    "scripted-judge": scripted["scripted-judge"],
}

# Not servable: the default goal's judge is not in the registry.
default_goal_without_judge = {
    "bad": dataclasses.replace(
        scripted["scripted"], default_goal=Goal("say DONE", judge_agent_id="nobody")
    )
}


def _fetch_with_context(ctx: RunContext[None], url: str) -> str:
    return url


# Not servable: a background tool runs off the agent loop and gets no RunContext.
background_with_context = {
    "bad": Agent(
        "test",
        tools=[Tool(_fetch_with_context, takes_ctx=True, metadata=background())],
    )
}


# A worker with only the judge: runs of "scripted" given to it fail, naming the agent.
judge_only = {"scripted-judge": scripted["scripted-judge"]}
