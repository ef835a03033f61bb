"""Every RPC given bad input answers with the right status and a clear message; serving goes on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel
from tests.integration.conftest import collect, script, text

BAD_RUN_IDS = {
    "empty": "",
    "oversized": "r" * 129,
    "garbage": "../{x}\n\x00 ☃",
    "hash tag": "{run}",
}


def _violations(exc: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def _expect(
    code: grpc.StatusCode, call: Callable[[], Awaitable[Any]], field: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call()
    assert err.value.code() == code, err.value.details()
    assert err.value.details()  # a message a person can act on
    if field is not None:
        assert field in _violations(err.value)
    return err.value


@pytest.fixture(autouse=True)
async def still_serving(keel: Keel) -> Any:
    """After each test the server still answers health checks and real work."""
    yield
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="keel.v1.AgentService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.AgentServiceStub(channel)
        out = await collect(
            stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(2))))
        )
        assert out.events[-1].WhichOneof("payload") == "finish"


@pytest.mark.parametrize("run_id", BAD_RUN_IDS.values(), ids=BAD_RUN_IDS.keys())
async def test_malformed_run_ids_are_invalid_argument_on_every_rpc(
    stub: pb_grpc.AgentServiceStub, run_id: str
) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await _expect(invalid, lambda: stub.GetRun(pb.GetRunRequest(run_id=run_id)), "run_id")
    await _expect(invalid, lambda: stub.CancelRun(pb.CancelRunRequest(run_id=run_id)), "run_id")
    await _expect(
        invalid, lambda: collect(stub.Observe(pb.ObserveRequest(run_id=run_id))), "run_id"
    )


async def test_negative_offset_is_invalid_argument(stub: pb_grpc.AgentServiceStub) -> None:
    done = await collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(1)))))
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: collect(stub.Observe(pb.ObserveRequest(run_id=done.run_id, offset=-1))),
        "offset",
    )


async def test_unknown_or_missing_agent_is_invalid_argument(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    for agent_id in ("nobody", "", "a" * 200):
        await _expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda a=agent_id: stub.StartRun(pb.StartRunRequest(agent_id=a, input="{}")),  # type: ignore[misc]
            "agent_id",
        )
        await _expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda a=agent_id: collect(stub.Stream(pb.StreamRequest(agent_id=a, input="{}"))),  # type: ignore[misc]
            "agent_id",
        )


@pytest.mark.parametrize(
    "bad_script",
    [
        "not json",
        "",
        "[]",
        '{"steps": "x"}',
        '{"steps": [{"text": -1}]}',
        '{"steps": [{"dance": 3}]}',
        '{"steps": [{"tool": "rm_rf", "args": {}}]}',
        '{"steps": [{"text": 2000000000}]}',
    ],
)
async def test_invalid_scripted_agent_json_is_invalid_argument(
    stub: pb_grpc.AgentServiceStub, bad_script: str
) -> None:
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=bad_script)),
        "input",
    )
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=bad_script))),
        "input",
    )


async def test_oversized_input_and_request_id_are_invalid_argument(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.StartRun(pb.StartRunRequest(agent_id="scripted", input="x" * (1 << 20 | 1))),
        "input",
    )
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(1)), request_id="q" * 500)
        ),
        "request_id",
    )


@pytest.mark.parametrize("token", ["garbage!", "bm90IGpzb24=", "e30=", "eyJ0IjogMX0="])
async def test_invalid_page_token_is_invalid_argument(
    stub: pb_grpc.AgentServiceStub, token: str
) -> None:
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.ListRuns(pb.ListRunsRequest(page_token=token)),
        "page_token",
    )


async def test_page_token_from_other_filters_or_negative_page_size_is_invalid_argument(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    for _ in range(3):
        await collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(1)))))
    page = await stub.ListRuns(pb.ListRunsRequest(page_size=1))
    assert page.next_page_token
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.ListRuns(
            pb.ListRunsRequest(agent_id="scripted", page_size=1, page_token=page.next_page_token)
        ),
        "page_token",
    )
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.ListRuns(pb.ListRunsRequest(page_size=-1)),
        "page_size",
    )
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.ListRuns(pb.ListRunsRequest(states=[42])),  # type: ignore[list-item]
        "states",
    )


@pytest.mark.parametrize(
    "decisions",
    [
        [],
        [pb.Decision(approve=pb.Approve())],  # no tool_call_id
        [pb.Decision(tool_call_id="c")],  # no decision
        [pb.Decision(tool_call_id="c", approve=pb.Approve(override_args_json="{nope"))],
        [pb.Decision(tool_call_id="c", approve=pb.Approve(override_args_json="[1, 2]"))],
        [pb.Decision(tool_call_id="c", result_json="not json")],
        [
            pb.Decision(tool_call_id="c", deny=pb.Deny()),
            pb.Decision(tool_call_id="c", deny=pb.Deny()),
        ],
    ],
    ids=[
        "none",
        "no id",
        "no decision",
        "bad override",
        "override not object",
        "bad result",
        "twice",
    ],
)
async def test_malformed_resume_decisions_are_invalid_argument(
    stub: pb_grpc.AgentServiceStub, decisions: list[pb.Decision]
) -> None:
    error = await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: collect(stub.Resume(pb.ResumeRequest(run_id="r1", decisions=decisions))),
    )
    assert any(field.startswith("decisions") for field in _violations(error))


async def test_resume_with_a_malformed_run_id_is_invalid_argument(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    decision = pb.Decision(tool_call_id="c", approve=pb.Approve())
    for run_id in BAD_RUN_IDS.values():
        await _expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda r=run_id: collect(  # type: ignore[misc]
                stub.Resume(pb.ResumeRequest(run_id=r, decisions=[decision]))
            ),
            "run_id",
        )
