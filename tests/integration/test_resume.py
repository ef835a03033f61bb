"""Human in the loop over gRPC: suspend for approval, Resume, on both backends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel
from tests.integration.conftest import (
    Collected,
    assert_contiguous,
    collect,
    payloads,
    record,
    script,
    text,
)
from tests.integration.test_streams import error_info

APPROVE = {"tool": "approve_me", "args": {"action": "deploy"}}
APPROVAL_SCRIPT = script(text(3), APPROVE, record("after"), text(2))


def approve(tool_call_id: str, override: dict[str, Any] | None = None) -> pb.Decision:
    args = json.dumps(override) if override is not None else ""
    return pb.Decision(tool_call_id=tool_call_id, approve=pb.Approve(override_args_json=args))


def deny(tool_call_id: str, message: str) -> pb.Decision:
    return pb.Decision(tool_call_id=tool_call_id, deny=pb.Deny(message=message))


async def suspend(stub: pb_grpc.AgentServiceStub, input: str = APPROVAL_SCRIPT) -> Collected:
    """Start a run and observe it until it suspends (stop_at_suspend)."""
    started = await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=input))
    out = await collect(
        stub.Observe(pb.ObserveRequest(run_id=started.run.run_id, stop_at_suspend=True))
    )
    assert payloads(out.events)[-1] == "suspended", payloads(out.events)
    return out


async def resume(
    stub: pb_grpc.AgentServiceStub, run_id: str, *decisions: pb.Decision, request_id: str = ""
) -> Collected:
    return await collect(
        stub.Resume(pb.ResumeRequest(run_id=run_id, decisions=decisions, request_id=request_id))
    )


@pytest.mark.executors
async def test_approval_suspends_the_run_and_resume_finishes_it_exactly_once(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    suspended = await suspend(stub)
    run_id = suspended.run_id
    kinds = payloads(suspended.events)
    assert kinds[-2:] == ["tool_call_approval", "suspended"]
    approval = suspended.events[-2].tool_call_approval
    assert (approval.tool_name, json.loads(approval.args_json)) == ("approve_me", APPROVE["args"])

    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert run.state == pb.RUN_STATE_SUSPENDED
    [pending] = run.pending_interrupts
    assert (pending.tool_call_id, pending.kind) == (
        approval.tool_call_id,
        pb.INTERRUPT_KIND_APPROVAL,
    )
    listed = await stub.ListRuns(pb.ListRunsRequest(states=[pb.RUN_STATE_SUSPENDED]))
    assert [r.run_id for r in listed.runs] == [run_id]

    resumed = await resume(stub, run_id, approve(approval.tool_call_id))
    # The Resume stream starts at the first event after the suspension.
    assert resumed.events[0].index == len(suspended.events)
    assert payloads(resumed.events)[:3] == ["resumed", "tool_call", "tool_result"]
    assert payloads(resumed.events)[-1] == "finish"
    result = resumed.events[2].tool_result
    assert json.loads(result.result_json) == {"approved": True, "args": APPROVE["args"]}

    whole = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0)))
    assert_contiguous(whole.events)
    assert whole.events[len(suspended.events) :] == resumed.events
    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert run.state == pb.RUN_STATE_SUCCEEDED and not run.pending_interrupts


async def test_observe_follows_a_run_across_its_suspension_by_default(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    started = await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=APPROVAL_SCRIPT))
    run_id = started.run.run_id
    following = asyncio.create_task(collect(stub.Observe(pb.ObserveRequest(run_id=run_id))))
    suspended = await suspend_seen(stub, run_id)
    assert not following.done()  # still following, through the suspension
    await resume(stub, run_id, approve(suspended.tool_call_approval.tool_call_id))
    out = await following
    assert_contiguous(out.events)
    assert {"suspended", "resumed"} <= set(payloads(out.events))
    assert payloads(out.events)[-1] == "finish"


async def suspend_seen(stub: pb_grpc.AgentServiceStub, run_id: str) -> pb.AgentEvent:
    out = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, stop_at_suspend=True)))
    return out.events[-2]


@pytest.mark.executors
async def test_deny_with_a_message_reaches_the_model_and_the_run_still_finishes(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    suspended = await suspend(stub)
    call_id = suspended.events[-2].tool_call_approval.tool_call_id
    resumed = await resume(stub, suspended.run_id, deny(call_id, "not on a friday"))
    [denial] = [e.tool_result for e in resumed.events if e.WhichOneof("payload") == "tool_result"][
        :1
    ]
    assert denial.tool_call_id == call_id and denial.denied
    assert "not on a friday" in denial.result_json
    assert payloads(resumed.events)[-1] == "finish"


async def test_approval_with_overridden_arguments_runs_the_tool_with_them(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    suspended = await suspend(stub)
    call_id = suspended.events[-2].tool_call_approval.tool_call_id
    resumed = await resume(stub, suspended.run_id, approve(call_id, {"action": "rollback"}))
    result = next(e.tool_result for e in resumed.events if e.WhichOneof("payload") == "tool_result")
    assert json.loads(result.result_json)["args"] == {"action": "rollback"}


@pytest.mark.executors
async def test_the_same_resume_sent_twice_has_one_effect_and_streams_from_the_same_point(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    suspended = await suspend(stub)
    call_id = suspended.events[-2].tool_call_approval.tool_call_id
    first = await resume(stub, suspended.run_id, approve(call_id), request_id="resume-1")
    again = await resume(stub, suspended.run_id, approve(call_id), request_id="resume-1")
    assert again.events == first.events  # same point, same events: nothing ran twice
    same_decision = await resume(stub, suspended.run_id, approve(call_id))
    assert same_decision.events == first.events
    whole = await collect(stub.Observe(pb.ObserveRequest(run_id=suspended.run_id)))
    assert payloads(whole.events).count("resumed") == 1
    assert payloads(whole.events).count("finish") == 1


async def test_conflicting_resume_is_interrupt_resolved_and_reused_request_id_is_rejected(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    suspended = await suspend(stub)
    call_id = suspended.events[-2].tool_call_approval.tool_call_id
    await resume(stub, suspended.run_id, approve(call_id), request_id="r-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await resume(stub, suspended.run_id, deny(call_id, "changed my mind"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(err.value)
    assert info.reason == "INTERRUPT_RESOLVED" and info.metadata["tool_call_id"] == call_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await resume(stub, suspended.run_id, deny(call_id, "other"), request_id="r-1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.executors
async def test_resume_of_a_running_finished_or_unknown_run_fails(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    decision = approve("call_0")
    running = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(1000, delay_ms=10)))
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await resume(stub, running.run.run_id, decision)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "RUN_NOT_SUSPENDED"
    await stub.CancelRun(pb.CancelRunRequest(run_id=running.run.run_id))

    finished = await collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=script())))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await resume(stub, finished.run_id, decision)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "RUN_NOT_SUSPENDED"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await resume(stub, "no-such-run", decision)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_tool_call_id_or_wrong_kind_of_answer_is_invalid_argument(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    suspended = await suspend(stub)
    call_id = suspended.events[-2].tool_call_approval.tool_call_id
    for decision in (
        approve("call_99"),
        pb.Decision(tool_call_id=call_id, result_json="42"),  # an approval is not answered so
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await resume(stub, suspended.run_id, decision)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    run = (await stub.GetRun(pb.GetRunRequest(run_id=suspended.run_id))).run
    assert run.state == pb.RUN_STATE_SUSPENDED  # nothing changed


async def test_several_pending_approvals_accept_decisions_in_several_resumes(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    both = {"parallel": [APPROVE, {"tool": "approve_me", "args": {"action": "migrate"}}]}
    suspended = await suspend(stub, script(text(2), both, text(1)))
    run_id = suspended.run_id
    ids = [
        e.tool_call_approval.tool_call_id
        for e in suspended.events
        if e.HasField("tool_call_approval")
    ]
    assert len(ids) == 2
    assert list(suspended.events[-1].suspended.tool_call_ids) == ids

    # The first answer alone does not resume the run: its stream waits.
    waiting = asyncio.create_task(resume(stub, run_id, approve(ids[0])))
    await asyncio.sleep(0.3)
    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert run.state == pb.RUN_STATE_SUSPENDED
    assert [p.tool_call_id for p in run.pending_interrupts] == [ids[1]]
    assert not waiting.done()

    rest = await resume(stub, run_id, deny(ids[1], "no migrations today"))
    first = await waiting
    assert first.events == rest.events  # both stream from the first event after the suspension
    results = {
        e.tool_result.tool_call_id: e.tool_result for e in rest.events if e.HasField("tool_result")
    }
    assert not results[ids[0]].denied and results[ids[1]].denied
    assert payloads(rest.events)[-1] == "finish"


async def test_two_different_resumes_racing_one_wins(stub: pb_grpc.AgentServiceStub) -> None:
    suspended = await suspend(stub)
    call_id = suspended.events[-2].tool_call_approval.tool_call_id
    outcomes = await asyncio.gather(
        resume(stub, suspended.run_id, approve(call_id)),
        resume(stub, suspended.run_id, deny(call_id, "no")),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if isinstance(o, Collected)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 1
    # Truly concurrent: ABORTED; one after the other: the interrupt was resolved first.
    assert losers[0].code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION)
    assert payloads(winners[0].events)[-1] == "finish"


@pytest.mark.executors
async def test_cancel_of_a_suspended_run_aborts_it(stub: pb_grpc.AgentServiceStub) -> None:
    suspended = await suspend(stub)
    cancelled = await stub.CancelRun(pb.CancelRunRequest(run_id=suspended.run_id, reason="stale"))
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    out = await collect(stub.Observe(pb.ObserveRequest(run_id=suspended.run_id)))
    assert_contiguous(out.events)
    assert payloads(out.events)[-1] == "abort"


async def test_a_suspended_run_never_expires_but_an_ended_one_does(start_keel: Any) -> None:
    keel: Keel = await start_keel(terminal_ttl_s=0.5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        suspended = await suspend(stub)
        await asyncio.sleep(1.0)  # twice the retention time of ended runs
        kept = await collect(
            stub.Observe(pb.ObserveRequest(run_id=suspended.run_id, stop_at_suspend=True))
        )
        assert kept.events == suspended.events
        call_id = suspended.events[-2].tool_call_approval.tool_call_id
        await resume(stub, suspended.run_id, approve(call_id))
        await asyncio.sleep(1.0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRun(pb.GetRunRequest(run_id=suspended.run_id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
