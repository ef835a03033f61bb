"""Goals over gRPC on both backends: attempts judged until the objective is met or none is
left, one run id throughout, the agent's default goal, goals with background tasks and on a
thread, and bad input."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.agents.testing import SATISFIED
from server.app import Keel, load_agents
from tests.integration.conftest import (
    Collected,
    assert_contiguous,
    collect,
    field_violations,
    payloads,
    text,
    text_of,
)

JUDGE = "scripted-judge"
REGISTRY = "tests.registries:options"


def goal_script(*steps: dict[str, Any], satisfy_on: int | None = None) -> str:
    body: dict[str, Any] = {"steps": list(steps)}
    if satisfy_on is not None:
        body["satisfy_on"] = satisfy_on
    return json.dumps(body)


def goal(max_attempts: int = 0, objective: str = "end with DONE") -> pb.Goal:
    return pb.Goal(objective=objective, judge_agent_id=JUDGE, max_attempts=max_attempts)


def evaluations(events: Sequence[pb.AgentEvent]) -> list[pb.GoalEvaluated]:
    return [e.goal_evaluated for e in events if e.WhichOneof("payload") == "goal_evaluated"]


@pytest.fixture
async def stub(start_keel: Callable[..., Any]) -> AsyncIterator[pb_grpc.AgentServiceStub]:
    keel: Keel = await start_keel(agents=REGISTRY)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        yield pb_grpc.AgentServiceStub(channel)


async def stream(stub: pb_grpc.AgentServiceStub, input: str, **kw: Any) -> Collected:
    request = pb.StreamRequest(agent_id=kw.pop("agent_id", "scripted"), input=input, **kw)
    out = await collect(stub.Stream(request))
    assert_contiguous(out.events)
    assert len(out.snapshots) == 1 and {e.run_id for e in out.events} == {out.run_id}
    return out


@pytest.mark.executors
async def test_a_goal_met_on_the_third_attempt(stub: pb_grpc.AgentServiceStub) -> None:
    out = await stream(stub, goal_script(text(2), satisfy_on=3), goal=goal(max_attempts=5))
    judged = evaluations(out.events)
    assert [(j.attempt, j.satisfied, j.score) for j in judged] == [
        (1, False, 0.0),
        (2, False, 0.0),
        (3, True, 1.0),
    ]
    assert {j.max_attempts for j in judged} == {5}
    assert judged[0].reason == f"the output does not say {SATISFIED}"
    # Each attempt played the script again, its deltas numbered on from the last.
    said = text_of(out.events)
    assert said == f"t0 t1 done not yett2 t3 done not yett4 t5 done {SATISFIED}"
    finish = out.events[-1]
    assert payloads(out.events)[-2:] == ["goal_evaluated", "finish"]
    assert finish.finish.output_text == f"done {SATISFIED}"
    assert finish.finish.HasField("goal_met") and finish.finish.goal_met
    run = (await stub.GetRun(pb.GetRunRequest(run_id=out.run_id))).run
    assert run.state == pb.RUN_STATE_SUCCEEDED
    assert run.goal == goal(max_attempts=5)
    assert (run.HasField("goal_met"), run.goal_met, run.goal_attempts) == (True, True, 3)
    # Every unsatisfied verdict came before the next attempt's first step.
    kinds = payloads(out.events)
    first, second, _ = (i for i, kind in enumerate(kinds) if kind == "goal_evaluated")
    assert kinds[first + 1] == "step_start" and kinds[second + 1] == "step_start"


@pytest.mark.executors
async def test_a_goal_never_met_stops_at_max_attempts(stub: pb_grpc.AgentServiceStub) -> None:
    out = await stream(stub, goal_script(text(1)), goal=goal(max_attempts=2))
    assert [(j.attempt, j.satisfied) for j in evaluations(out.events)] == [(1, False), (2, False)]
    finish = out.events[-1].finish
    assert finish.HasField("goal_met") and not finish.goal_met
    assert finish.output_text == "done"
    run = (await stub.GetRun(pb.GetRunRequest(run_id=out.run_id))).run
    assert run.state == pb.RUN_STATE_SUCCEEDED  # the run finished; its goal was not met
    assert (run.HasField("goal_met"), run.goal_met, run.goal_attempts) == (True, False, 2)
    listed = (await stub.ListRuns(pb.ListRunsRequest())).runs
    assert [(r.run_id, r.goal_met, r.goal_attempts) for r in listed] == [(out.run_id, False, 2)]


async def test_a_goal_met_at_once_takes_one_attempt(stub: pb_grpc.AgentServiceStub) -> None:
    out = await stream(stub, goal_script(text(1), satisfy_on=1), goal=goal())
    assert [(j.attempt, j.satisfied, j.max_attempts) for j in evaluations(out.events)] == [
        (1, True, 3)  # max_attempts 0 means 3
    ]
    assert out.events[-1].finish.goal_met


async def test_a_run_without_a_goal_has_no_judgment(stub: pb_grpc.AgentServiceStub) -> None:
    out = await stream(stub, goal_script(text(1), satisfy_on=2))
    assert evaluations(out.events) == []
    assert not out.events[-1].finish.HasField("goal_met")
    run = (await stub.GetRun(pb.GetRunRequest(run_id=out.run_id))).run
    assert not run.HasField("goal") and not run.HasField("goal_met") and run.goal_attempts == 0


async def test_the_agents_default_goal_applies_unless_the_request_sets_one(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    agents = {a.agent_id: a for a in (await stub.ListAgents(pb.ListAgentsRequest())).agents}
    default = pb.Goal(objective="say DONE", judge_agent_id=JUDGE, max_attempts=4)
    assert agents["scripted-goal"].default_goal == default
    assert not agents["scripted"].HasField("default_goal")

    by_default = await stream(stub, goal_script(text(1), satisfy_on=2), agent_id="scripted-goal")
    assert [j.attempt for j in evaluations(by_default.events)] == [1, 2]
    run = (await stub.GetRun(pb.GetRunRequest(run_id=by_default.run_id))).run
    assert run.goal == default

    asked = await stream(
        stub, goal_script(text(1)), agent_id="scripted-goal", goal=goal(max_attempts=1)
    )
    assert [(j.attempt, j.max_attempts) for j in evaluations(asked.events)] == [(1, 1)]
    assert not asked.events[-1].finish.goal_met


async def test_a_goal_is_judged_after_the_attempts_tasks(stub: pb_grpc.AgentServiceStub) -> None:
    # With until_idle, an attempt is over when its background tasks are: the judge
    # sees the answer to the task's outcome.
    slow = {"tool": "slow", "args": {"key": "k", "duration_ms": 50}}
    out = await stream(stub, goal_script(slow, text(1), satisfy_on=2), goal=goal(), until_idle=True)
    kinds = payloads(out.events)
    judged_at = [i for i, kind in enumerate(kinds) if kind == "goal_evaluated"]
    completed_at = [
        i for i, e in enumerate(out.events) if e.task.status == pb.TASK_STATUS_COMPLETED
    ]
    assert len(judged_at) == 2 and len(completed_at) == 2  # one task per attempt
    assert completed_at[0] < judged_at[0] < completed_at[1] < judged_at[1]
    assert out.events[-1].finish.goal_met


async def test_a_goals_attempts_and_feedback_join_the_thread(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread = (await stub.CreateThread(pb.CreateThreadRequest())).thread
    out = await stream(
        stub, goal_script(text(1), satisfy_on=2), goal=goal(), thread_id=thread.thread_id
    )
    assert out.events[-1].finish.goal_met
    messages = (
        await stub.ListThreadMessages(
            pb.ListThreadMessagesRequest(thread_id=thread.thread_id, page_size=100)
        )
    ).messages
    prompts = [
        part.user_prompt.text
        for m in messages
        for part in m.parts
        if part.WhichOneof("part") == "user_prompt"
    ]
    assert len(prompts) == 2 and prompts[1].startswith("[goal] Attempt 1 of 3")
    assert "the output does not say DONE" in prompts[1]


@pytest.mark.parametrize(
    ("bad", "field", "says"),
    [
        (pb.Goal(judge_agent_id=JUDGE), "goal.objective", "is required"),
        (pb.Goal(objective="x"), "goal.judge_agent_id", "is required"),
        (pb.Goal(objective="x", judge_agent_id="nobody"), "goal.judge_agent_id", "unknown agent"),
        (
            pb.Goal(objective="x", judge_agent_id="scripted"),
            "goal.judge_agent_id",
            "cannot judge",
        ),
        (pb.Goal(objective="x", judge_agent_id=JUDGE, max_attempts=-1), "goal.max_attempts", ""),
        (pb.Goal(objective="x", judge_agent_id=JUDGE, max_attempts=101), "goal.max_attempts", ""),
        (
            pb.Goal(objective="x" * (64 * 1024 + 1), judge_agent_id=JUDGE),
            "goal.objective",
            "the limit is",
        ),
    ],
)
async def test_bad_goals_are_invalid_arguments_and_start_nothing(
    stub: pb_grpc.AgentServiceStub, bad: pb.Goal, field: str, says: str
) -> None:
    for call in (
        stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=goal_script(), goal=bad)),
        collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=goal_script(), goal=bad))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(caught.value)
        assert any(f == field and says in d for f, d in violations), violations
    assert (await stub.ListRuns(pb.ListRunsRequest())).runs == []


def test_a_default_goal_whose_judge_is_missing_is_refused_at_startup(
    make_settings: Callable[..., Any],
) -> None:
    with pytest.raises(ValueError, match=r"agent 'bad'.*unknown agent 'nobody'"):
        load_agents(make_settings(agents="tests.registries:default_goal_without_judge"))
