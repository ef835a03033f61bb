"""keel_client's decisions (Resume) against a real Keel server (blocking: test_client_sync.py).

The scripted agent's `approve_me` tool requires approval: its run suspends
with a `tool_call_approval` event, and the client approves or denies it,
from inside the loop that reads the run or from anywhere else.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel_client import KeelClient, decisions

from server.app import Keel
from tests.integration.conftest import assert_contiguous, payloads, script, text

FAST: dict[str, Any] = {"initial_backoff_s": 0.02, "max_backoff_s": 0.5, "max_reconnects": 20}


def approve_me(**args: Any) -> dict[str, Any]:
    return {"tool": "approve_me", "args": args}


def tool_result(events: list[pb.AgentEvent], tool_name: str) -> pb.ToolResult:
    results = [e.tool_result for e in events if e.WhichOneof("payload") == "tool_result"]
    matching = [r for r in results if r.tool_name == tool_name]
    assert len(matching) == 1, results
    return matching[0]


def test_decision_messages_carry_json() -> None:
    approve = decisions.approval("call_1", {"action": "deploy", "n": 2})
    assert approve.tool_call_id == "call_1"
    assert json.loads(approve.approve.override_args_json) == {"action": "deploy", "n": 2}
    assert decisions.approval("call_1").approve.override_args_json == ""
    assert decisions.denial("call_2", "no").deny.message == "no"
    assert json.loads(decisions.answer("call_3", [1, {"a": None}]).result_json) == [1, {"a": None}]
    with pytest.raises(TypeError):
        decisions.approval("call_1", [1, 2])  # type: ignore[arg-type]


async def test_approve_inside_the_events_loop_resumes_the_run_it_reads(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        handle = client.stream("scripted", script(text(5), approve_me(action="deploy"), text(3)))
        events: list[pb.AgentEvent] = []
        async for event in handle.events():
            events.append(event)
            if event.WhichOneof("payload") == "tool_call_approval":
                snapshot = await handle.approve(event.tool_call_approval.tool_call_id)
                assert snapshot.run.run_id == handle.run_id

    assert_contiguous(events)
    kinds = payloads(events)
    assert kinds.index("tool_call_approval") < kinds.index("suspended") < kinds.index("resumed")
    assert kinds[-1] == "finish"
    result = tool_result(events, "approve_me")
    assert not result.denied
    assert json.loads(result.result_json) == {"approved": True, "args": {"action": "deploy"}}


async def test_deny_and_override_reach_the_tool_call(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        denied = client.stream("scripted", script(approve_me(action="deploy")))
        async for event in denied.events():
            if event.WhichOneof("payload") == "tool_call_approval":
                await denied.deny(event.tool_call_approval.tool_call_id, "not on a Friday")
        assert denied.run_id is not None
        events = [e async for e in client.run(denied.run_id).events()]
        result = tool_result(events, "approve_me")
        assert result.denied and "not on a Friday" in result.result_json

        overridden = client.stream("scripted", script(approve_me(action="deploy")))
        async for event in overridden.events():
            if event.WhichOneof("payload") == "tool_call_approval":
                call_id = event.tool_call_approval.tool_call_id
                await overridden.approve(call_id, override_args={"action": "canary"})
        assert overridden.run_id is not None
        events = [e async for e in client.run(overridden.run_id).events()]
        result = tool_result(events, "approve_me")
        assert json.loads(result.result_json)["args"] == {"action": "canary"}


async def test_inbox_stops_at_suspend_and_approves_from_elsewhere(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        started = await client.start_run("scripted", script(text(3), approve_me(x=1), text(2)))
        inbox = client.run(started.run_id, stop_at_suspend=True)
        first = [e async for e in inbox.events()]  # ends right after `suspended`
        assert payloads(first)[-1] == "suspended"
        run = await client.get_run(started.run_id)
        assert run.state == pb.RUN_STATE_SUSPENDED
        [pending] = run.pending_interrupts

        await client.approve(started.run_id, pending.tool_call_id, request_id="approve-1")
        # The same decision again (same request_id) has no further effect.
        await client.approve(started.run_id, pending.tool_call_id, request_id="approve-1")

        inbox.stop_at_suspend = False
        rest = [e async for e in inbox.events()]  # from where the inbox stopped
        assert_contiguous(first + rest)
        assert payloads(rest)[0] == "resumed" and payloads(rest)[-1] == "finish"

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.deny(started.run_id, pending.tool_call_id, "too late")
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_decisions_need_the_run_id_first(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        handle = client.stream("scripted", script(text(1)))
        with pytest.raises(RuntimeError, match="not known yet"):
            await handle.approve("call_0")
