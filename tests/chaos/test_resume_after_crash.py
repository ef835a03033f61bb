"""A suspended run outlives its process: Resume through a new one, and the run goes on once."""

from __future__ import annotations

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.events.log import EventLog
from tests.chaos.conftest import Cluster, expected_text, kinds, observe_all, script
from tests.chaos.test_takeover import start_run, watch_until

STEPS = (
    {"text": 5},
    {"tool": "approve_me", "args": {"action": "deploy"}},
    {"tool": "record", "args": {"key": "after"}},
    {"text": 3},
)


async def test_resume_after_sigkill_of_the_suspended_runs_process(
    cluster: Cluster, store: EventLog
) -> None:
    a = await cluster.start()
    run_id = await start_run(a, script(*STEPS))
    seen = await watch_until(a, run_id, lambda events: "suspended" in kinds(events))
    approval = next(e.tool_call_approval for e in seen if e.HasField("tool_call_approval"))
    a.kill()
    await a.wait()

    b = await cluster.start()  # a new process; nobody else is left
    async with grpc.aio.insecure_channel(b.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
        assert run.state == pb.RUN_STATE_SUSPENDED
        assert [p.tool_call_id for p in run.pending_interrupts] == [approval.tool_call_id]
        decision = pb.Decision(tool_call_id=approval.tool_call_id, approve=pb.Approve())
        resumed = []
        async for response in stub.Resume(
            pb.ResumeRequest(run_id=run_id, decisions=[decision], request_id="approve-1")
        ):
            resumed.extend(response.events.events)

    events = await observe_all(b.target, run_id)
    assert [e.index for e in events] == list(range(len(events)))
    assert resumed == events[len(seen) :]
    flow = [
        k
        for k in kinds(events)
        if k in ("tool_call_approval", "suspended", "resumed", "tool_result", "finish")
    ]
    assert flow == [
        "tool_call_approval",
        "suspended",
        "resumed",
        "tool_result",
        "tool_result",
        "finish",
    ]
    assert "".join(e.text_delta.delta for e in events if e.HasField("text_delta")) == expected_text(
        *STEPS
    )
    assert await store.get_counter(run_id, "after") == 1
