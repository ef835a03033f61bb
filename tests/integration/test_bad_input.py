"""Every RPC given bad input answers with the right status and a clear message; serving goes on."""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
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


# -- threads ------------------------------------------------------------------

BAD_THREAD_IDS = {
    "oversized": "t" * 65,
    "colon": "a:b",
    "hash tag": "{thread}",
    "space": "my thread",
    "garbage": "../\n\x00 ☃",
    "leading dot": ".hidden",
}


@pytest.mark.parametrize("thread_id", BAD_THREAD_IDS.values(), ids=BAD_THREAD_IDS.keys())
async def test_malformed_thread_ids_are_invalid_argument_on_every_rpc(
    stub: pb_grpc.AgentServiceStub, thread_id: str
) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: stub.CreateThread(pb.CreateThreadRequest(thread_id=thread_id)),
        lambda: stub.GetThread(pb.GetThreadRequest(thread_id=thread_id)),
        lambda: stub.DeleteThread(pb.DeleteThreadRequest(thread_id=thread_id)),
        lambda: stub.ListThreadMessages(pb.ListThreadMessagesRequest(thread_id=thread_id)),
        lambda: stub.ListRuns(pb.ListRunsRequest(thread_id=thread_id)),
        lambda: stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(1)), thread_id=thread_id)
        ),
        lambda: collect(
            stub.Stream(
                pb.StreamRequest(agent_id="scripted", input=script(text(1)), thread_id=thread_id)
            )
        ),
    ]
    for call in calls:
        await _expect(invalid, call, "thread_id")


async def test_a_thread_id_is_required_where_a_thread_is_named(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    for call in (
        lambda: stub.GetThread(pb.GetThreadRequest()),
        lambda: stub.DeleteThread(pb.DeleteThreadRequest()),
        lambda: stub.ListThreadMessages(pb.ListThreadMessagesRequest()),
    ):
        await _expect(grpc.StatusCode.INVALID_ARGUMENT, call, "thread_id")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"resource_id": "has space"}, "resource_id"),
        ({"resource_id": "{slot}"}, "resource_id"),
        ({"resource_id": "r" * 129}, "resource_id"),
        ({"resource_id": "line\nbreak"}, "resource_id"),
        ({"metadata": {f"k{n}": "v" for n in range(65)}}, "metadata"),
        ({"metadata": {"": "empty key"}}, "metadata"),
        ({"metadata": {"k" * 129: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 1025}}, "metadata['k']"),
        ({"request_id": "{bad}"}, "request_id"),
    ],
    ids=[
        "resource space",
        "resource braces",
        "resource oversized",
        "resource control",
        "metadata too many",
        "metadata empty key",
        "metadata long key",
        "metadata long value",
        "request id",
    ],
)
async def test_malformed_create_thread_requests_are_invalid_argument(
    stub: pb_grpc.AgentServiceStub, request_fields: dict[str, Any], field: str
) -> None:
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.CreateThread(pb.CreateThreadRequest(**request_fields)),
        field,
    )


async def test_unknown_threads_are_not_found_on_every_rpc(stub: pb_grpc.AgentServiceStub) -> None:
    missing = "no-such-thread"
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: stub.GetThread(pb.GetThreadRequest(thread_id=missing)),
        lambda: stub.DeleteThread(pb.DeleteThreadRequest(thread_id=missing)),
        lambda: stub.ListThreadMessages(pb.ListThreadMessagesRequest(thread_id=missing)),
        lambda: stub.ListThreadMessages(
            pb.ListThreadMessagesRequest(thread_id=missing, newest_first=True)
        ),
        lambda: stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(1)), thread_id=missing)
        ),
        lambda: collect(
            stub.Stream(
                pb.StreamRequest(agent_id="scripted", input=script(text(1)), thread_id=missing)
            )
        ),
    ]
    for call in calls:
        error = await _expect(grpc.StatusCode.NOT_FOUND, call)
        assert missing in (error.details() or "")
    # A thread-less filter on an unknown thread just lists nothing.
    assert (await stub.ListRuns(pb.ListRunsRequest(thread_id=missing))).runs == []


async def test_an_unknown_busy_policy_is_invalid_argument(stub: pb_grpc.AgentServiceStub) -> None:
    thread = (await stub.CreateThread(pb.CreateThreadRequest())).thread
    for policy in (5, 99, -1):
        await _expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda p=policy: stub.StartRun(  # type: ignore[misc]
                pb.StartRunRequest(
                    agent_id="scripted",
                    input=script(text(1)),
                    thread_id=thread.thread_id,
                    busy_policy=p,
                )
            ),
            "busy_policy",
        )


async def test_thread_page_tokens_from_other_filters_are_invalid_argument(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    threads = [(await stub.CreateThread(pb.CreateThreadRequest())).thread for _ in range(2)]
    for thread in threads:
        for _ in range(2):
            await collect(
                stub.Stream(
                    pb.StreamRequest(
                        agent_id="scripted", input=script(text(1)), thread_id=thread.thread_id
                    )
                )
            )
    first, second = (t.thread_id for t in threads)
    runs = await stub.ListRuns(pb.ListRunsRequest(thread_id=first, page_size=1))
    messages = await stub.ListThreadMessages(
        pb.ListThreadMessagesRequest(thread_id=first, page_size=1)
    )
    listed = await stub.ListThreads(pb.ListThreadsRequest(page_size=1))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await _expect(
        invalid,
        lambda: stub.ListRuns(
            pb.ListRunsRequest(thread_id=second, page_size=1, page_token=runs.next_page_token)
        ),
        "page_token",
    )
    await _expect(
        invalid,
        lambda: stub.ListRuns(pb.ListRunsRequest(page_size=1, page_token=runs.next_page_token)),
        "page_token",
    )
    await _expect(
        invalid,
        lambda: stub.ListThreadMessages(
            pb.ListThreadMessagesRequest(thread_id=second, page_token=messages.next_page_token)
        ),
        "page_token",
    )
    await _expect(
        invalid,
        lambda: stub.ListThreads(
            pb.ListThreadsRequest(resource_id="someone", page_token=listed.next_page_token)
        ),
        "page_token",
    )
    for token in ("garbage!", "e30=", "eyJpIjogLTEsICJmIjogIngifQ=="):
        await _expect(
            invalid,
            lambda t=token: stub.ListThreadMessages(  # type: ignore[misc]
                pb.ListThreadMessagesRequest(thread_id=first, page_token=t)
            ),
            "page_token",
        )
    for call in (
        lambda: stub.ListThreads(pb.ListThreadsRequest(page_size=-1)),
        lambda: stub.ListThreadMessages(
            pb.ListThreadMessagesRequest(thread_id=first, page_size=-1)
        ),
    ):
        await _expect(invalid, call, "page_size")


# -- found by fuzzing the API (tests/fuzz) ----------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x0b" * 1000],
    ids=["corrupt", "truncated", "bad utf-8", "groups nested too deep"],
)
async def test_a_body_that_does_not_parse_is_invalid_argument(
    channel: grpc.aio.Channel, body: bytes
) -> None:
    """gRPC answers UNKNOWN (naming the parser's exception) for a request it cannot parse."""
    observe = channel.unary_stream("/keel.v1.AgentService/Observe", request_serializer=bytes)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: collect(observe(body)),
        *[
            lambda m=method: channel.unary_unary(  # type: ignore[misc]
                f"/keel.v1.AgentService/{m}", request_serializer=bytes
            )(body)
            for method in ("GetRun", "StartRun")
        ],
    ]
    for call in calls:
        error = await _expect(grpc.StatusCode.INVALID_ARGUMENT, call, "request")
        assert "keel.v1." in (error.details() or "")


async def test_json_nested_too_deeply_is_invalid_argument(stub: pb_grpc.AgentServiceStub) -> None:
    """json.loads raises RecursionError, which is no ValueError."""
    deep = "[" * 100_000 + "]" * 100_000
    for decision, field in [
        (pb.Decision(tool_call_id="c", result_json=deep), "decisions[0].result_json"),
        (
            pb.Decision(tool_call_id="c", approve=pb.Approve(override_args_json=deep)),
            "decisions[0].approve.override_args_json",
        ),
    ]:
        await _expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda d=decision: collect(  # type: ignore[misc]
                stub.Resume(pb.ResumeRequest(run_id="r1", decisions=[d]))
            ),
            field,
        )
    token = base64.urlsafe_b64encode(deep.encode()).decode()
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.ListRuns(pb.ListRunsRequest(page_token=token)),
        "page_token",
    )


def _forged(token: str, **changes: Any) -> str:
    """A page token the server issued with values of its body changed (its digest kept)."""
    body = json.loads(base64.urlsafe_b64decode(token))
    return base64.urlsafe_b64encode(json.dumps({**body, **changes}).encode()).decode()


async def test_page_tokens_forged_with_values_out_of_range_are_invalid_argument(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    """Infinity as a cursor's time, a position past 64 bits or a bool as a position
    (JSON allows them; the server's digest of the filters does not guard the values)."""
    thread = (await stub.CreateThread(pb.CreateThreadRequest())).thread.thread_id
    await stub.CreateThread(pb.CreateThreadRequest())
    await collect(
        stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(1)), thread_id=thread))
    )
    slow = script({"tool": "slow", "args": {"key": "k"}})
    for _ in range(2):
        await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=slow))
    schedules = [
        await stub.CreateSchedule(
            pb.CreateScheduleRequest(
                agent_id="scripted", cron="0 0 1 1 *", input=script(text(1)), paused=True
            )
        )
        for _ in range(2)
    ]
    schedule = schedules[0].schedule.schedule_id
    for _ in range(2):
        await stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id=schedule))
    for _ in range(200):  # the runs' tasks
        if len((await stub.ListTasks(pb.ListTasksRequest())).tasks) >= 2:
            break
        await asyncio.sleep(0.05)

    requests: list[tuple[str, Any, dict[str, Any]]] = [
        ("ListRuns", pb.ListRunsRequest(page_size=1), {"t": math.inf}),
        ("ListThreads", pb.ListThreadsRequest(page_size=1), {"t": math.inf}),
        ("ListTasks", pb.ListTasksRequest(page_size=1), {"t": math.inf}),
        ("ListSchedules", pb.ListSchedulesRequest(page_size=1), {"t": math.inf}),
        *[
            (
                "ListThreadMessages",
                pb.ListThreadMessagesRequest(thread_id=thread, page_size=1, newest_first=newest),
                {"i": position},
            )
            for newest in (False, True)
            for position in (10**30, 2**63, True)
        ],
        *[
            (
                "ListScheduleRuns",
                pb.ListScheduleRunsRequest(schedule_id=schedule, page_size=1),
                {"s": seq},
            )
            for seq in (True, 10**30)
        ],
    ]
    for method, request, changes in requests:
        issued = (await getattr(stub, method)(request)).next_page_token
        assert issued, method
        request.page_token = _forged(issued, **changes)
        await _expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda m=method, r=request: getattr(stub, m)(r),  # type: ignore[misc]
            "page_token",
        )


@pytest.mark.parametrize("timezone", ["Europe", "a" * 300], ids=["a folder", "too long"])
async def test_a_time_zone_that_names_no_zone_file_is_invalid_argument(
    stub: pb_grpc.AgentServiceStub, timezone: str
) -> None:
    """ZoneInfo raises OSError (IsADirectoryError, file name too long), not ValueError."""
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.CreateSchedule(
            pb.CreateScheduleRequest(
                agent_id="scripted", cron="0 0 1 1 *", timezone=timezone, input=script(text(1))
            )
        ),
        "timezone",
    )


@pytest.mark.parametrize(
    "json_text",
    ['"\\ud800"', '{"a": ["\\udfff"]}', "[" * 300 + "]" * 300],
    ids=["lone surrogate", "lone surrogate inside", "deeper than history can hold"],
)
async def test_decision_json_the_run_cannot_store_is_invalid_argument(
    stub: pb_grpc.AgentServiceStub, json_text: str
) -> None:
    """Valid JSON whose value the run's history cannot hold: accepted, it failed the run."""
    for decision, field in [
        (pb.Decision(tool_call_id="c", result_json=json_text), "decisions[0].result_json"),
        (
            pb.Decision(tool_call_id="c", approve=pb.Approve(override_args_json=json_text)),
            "decisions[0].approve.override_args_json",
        ),
    ]:
        if field.endswith("override_args_json") and not json_text.startswith("{"):
            continue  # not an object: refused as such
        await _expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda d=decision: collect(  # type: ignore[misc]
                stub.Resume(pb.ResumeRequest(run_id="r1", decisions=[d]))
            ),
            field,
        )


async def test_an_error_that_quotes_a_long_request_stays_readable(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    """Messages that quote the request (a cron expression, a time zone, a field mask's
    path, the scripted agent's input check) or name thousands of bad fields: a status
    past the client's 16 KB limit on trailers reached it as RESOURCE_EXHAUSTED, without
    the error."""
    long = "☃" * 100_000
    calls: list[tuple[Callable[[], Awaitable[Any]], str]] = [
        (
            lambda: stub.CreateSchedule(
                pb.CreateScheduleRequest(agent_id="scripted", cron=f"1{long} * * * *")
            ),
            "cron",
        ),
        (
            lambda: stub.CreateSchedule(
                pb.CreateScheduleRequest(agent_id="scripted", cron="0 0 1 1 *", timezone=long)
            ),
            "timezone",
        ),
        (
            lambda: stub.UpdateSchedule(
                pb.UpdateScheduleRequest(
                    schedule=pb.Schedule(schedule_id="s"),
                    update_mask=field_mask_pb2.FieldMask(paths=[long]),
                )
            ),
            "update_mask",
        ),
        (
            lambda: stub.StartRun(
                pb.StartRunRequest(agent_id="scripted", input=script({"tool": long}))
            ),
            "input",
        ),
        (
            lambda: collect(
                stub.Resume(pb.ResumeRequest(run_id="r1", decisions=[pb.Decision()] * 20_000))
            ),
            "decisions[0].tool_call_id",
        ),
    ]
    for call, field in calls:
        error = await _expect(grpc.StatusCode.INVALID_ARGUMENT, call, field)
        assert len((error.details() or "").encode()) <= 1000
