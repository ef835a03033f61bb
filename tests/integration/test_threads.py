"""Threads over gRPC on both backends: memory across runs, the busy policies, what each
ending leaves in the thread, thread retention, and the RPCs of the thread resource."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
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
    text_of,
)
from tests.integration.test_resume import APPROVE, approve, resume
from tests.integration.test_streams import error_info

ECHO = {"echo_history": True}
SLOW = text(40, delay_ms=25)  # about a second: long enough to be busy, short enough to wait
REQUEST, RESPONSE = pb.MESSAGE_KIND_REQUEST, pb.MESSAGE_KIND_RESPONSE
ENQUEUE = pb.THREAD_BUSY_POLICY_ENQUEUE
INTERRUPT = pb.THREAD_BUSY_POLICY_INTERRUPT
ROLLBACK = pb.THREAD_BUSY_POLICY_ROLLBACK


async def new_thread(stub: pb_grpc.AgentServiceStub, **fields: Any) -> str:
    created = await stub.CreateThread(pb.CreateThreadRequest(**fields))
    return created.thread.thread_id


async def turn(
    stub: pb_grpc.AgentServiceStub, thread_id: str, input: str, **fields: Any
) -> Collected:
    """One run on the thread, streamed to its end."""
    request = pb.StreamRequest(agent_id="scripted", input=input, thread_id=thread_id, **fields)
    out = await collect(stub.Stream(request))
    assert_contiguous(out.events)
    return out


async def start(
    stub: pb_grpc.AgentServiceStub, thread_id: str, input: str, policy: int = 0
) -> pb.Run:
    request = pb.StartRunRequest(
        agent_id="scripted", input=input, thread_id=thread_id, busy_policy=policy
    )
    return (await stub.StartRun(request)).run


async def messages(stub: pb_grpc.AgentServiceStub, thread_id: str) -> list[pb.ThreadMessage]:
    page = await stub.ListThreadMessages(
        pb.ListThreadMessagesRequest(thread_id=thread_id, page_size=1000)
    )
    assert page.next_page_token == ""
    return list(page.messages)


def shape(items: list[pb.ThreadMessage]) -> list[tuple[str, int, list[str]]]:
    """(run id, kind, part kinds) of each message: what a test compares."""
    return [(m.run_id, m.kind, [p.WhichOneof("part") or "" for p in m.parts]) for m in items]


async def until_event(stub: pb_grpc.AgentServiceStub, run_id: str, payload: str) -> None:
    """Follow the run until it emits an event with this payload."""
    async for response in stub.Observe(pb.ObserveRequest(run_id=run_id)):
        if response.WhichOneof("kind") == "events" and payload in payloads(response.events.events):
            return
    raise AssertionError(f"run {run_id} ended without a {payload} event")


async def observed(stub: pb_grpc.AgentServiceStub, run_id: str) -> Collected:
    out = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id)))
    assert_contiguous(out.events)
    return out


# -- memory across runs ---------------------------------------------------------


@pytest.mark.executors
async def test_the_third_turn_of_a_conversation_sees_the_first_two(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub, resource_id="user-1")
    replies, run_ids = [], []
    for _ in range(3):
        out = await turn(stub, thread_id, script(ECHO, text(2)))
        assert out.snapshots[0].run.thread_id == thread_id
        replies.append(text_of(out.events))
        run_ids.append(out.run_id)
    assert replies == [f"history={n} t0 t1 done" for n in range(3)]
    listed = await messages(stub, thread_id)
    assert [m.index for m in listed] == list(range(6))
    assert shape(listed) == [
        item
        for run_id in run_ids
        for item in ((run_id, REQUEST, ["user_prompt"]), (run_id, RESPONSE, ["text"]))
    ]
    assert listed[0].parts[0].user_prompt.text == script(ECHO, text(2))
    assert listed[5].parts[0].text.text.endswith("done")
    thread = (await stub.GetThread(pb.GetThreadRequest(thread_id=thread_id))).thread
    assert (thread.message_count, thread.active_run_id, thread.resource_id) == (6, "", "user-1")
    runs = await stub.ListRuns(pb.ListRunsRequest(thread_id=thread_id))
    assert [r.run_id for r in runs.runs] == run_ids[::-1]


async def test_a_run_without_a_thread_starts_afresh_as_before(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    await turn(stub, thread_id, script(text(1)))
    alone = await collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(ECHO))))
    assert text_of(alone.events) == "history=0 done"
    assert alone.snapshots[0].run.thread_id == ""
    assert ":" not in alone.run_id


async def test_thread_messages_page_both_ways_with_tokens_bound_to_thread_and_order(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    for _ in range(3):
        await turn(stub, thread_id, script(text(1)))
    seen, token = [], ""
    while True:
        page = await stub.ListThreadMessages(
            pb.ListThreadMessagesRequest(thread_id=thread_id, page_size=4, page_token=token)
        )
        seen += [m.index for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(range(6))
    newest, token = [], ""
    while True:
        page = await stub.ListThreadMessages(
            pb.ListThreadMessagesRequest(
                thread_id=thread_id, page_size=4, page_token=token, newest_first=True
            )
        )
        newest += [m.index for m in page.messages]
        token = page.next_page_token
        if not token:
            break
        with pytest.raises(grpc.aio.AioRpcError) as wrong_order:
            await stub.ListThreadMessages(
                pb.ListThreadMessagesRequest(thread_id=thread_id, page_token=token)
            )
        assert wrong_order.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert newest == list(range(5, -1, -1))


# -- the busy policies --------------------------------------------------------


async def test_reject_refuses_a_second_run_naming_the_active_one(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    active = await start(stub, thread_id, script(SLOW))
    for policy in (pb.THREAD_BUSY_POLICY_UNSPECIFIED, pb.THREAD_BUSY_POLICY_REJECT):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await start(stub, thread_id, script(text(1)), policy)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(refused.value)
        assert info.reason == "THREAD_BUSY"
        assert info.metadata["active_run_id"] == active.run_id
        assert info.metadata["thread_id"] == thread_id
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await collect(
            stub.Stream(
                pb.StreamRequest(agent_id="scripted", input=script(text(1)), thread_id=thread_id)
            )
        )
    assert error_info(streamed.value).reason == "THREAD_BUSY"
    await observed(stub, active.run_id)
    await turn(stub, thread_id, script(text(1)))  # idle again: accepted


@pytest.mark.executors
async def test_enqueued_runs_start_one_after_another_in_order_and_see_each_other(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    active = await start(stub, thread_id, script(SLOW))
    # The first waiting run is streamed from the start: snapshot QUEUED, then its events.
    streamed = asyncio.create_task(
        turn(stub, thread_id, script(ECHO, text(1)), busy_policy=ENQUEUE)
    )
    waiting: list[str] = []
    for _ in range(30):
        thread = (await stub.GetThread(pb.GetThreadRequest(thread_id=thread_id))).thread
        if thread.queued_run_ids:
            waiting.append(thread.queued_run_ids[0])
            break
        await asyncio.sleep(0.02)
    for _ in range(2):
        waiting.append((await start(stub, thread_id, script(ECHO, text(1)), ENQUEUE)).run_id)
    thread = (await stub.GetThread(pb.GetThreadRequest(thread_id=thread_id))).thread
    assert thread.active_run_id == active.run_id
    assert list(thread.queued_run_ids) == waiting
    for run_id in waiting:
        run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
        assert run.state == pb.RUN_STATE_QUEUED
    queued_only = await stub.ListRuns(
        pb.ListRunsRequest(thread_id=thread_id, states=[pb.RUN_STATE_QUEUED])
    )
    assert set(waiting) <= {r.run_id for r in queued_only.runs}

    first = await streamed
    assert first.snapshots[0].run.state == pb.RUN_STATE_QUEUED
    assert text_of(first.events) == "history=1 t0 done"
    replies = [text_of((await observed(stub, run_id)).events) for run_id in waiting[1:]]
    assert replies == ["history=2 t0 done", "history=3 t0 done"]
    order = [m.run_id for m in await messages(stub, thread_id)]
    assert order == [r for run_id in [active.run_id, *waiting] for r in (run_id, run_id)]


async def test_interrupt_cancels_the_active_run_during_a_tool_call_and_keeps_what_it_did(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    slow_tool = {"tool": "record", "args": {"key": "k", "delay_ms": 5000}}
    active = await start(stub, thread_id, script(text(2), slow_tool, text(2)))
    await until_event(stub, active.run_id, "tool_call")
    newer = await start(stub, thread_id, script(ECHO, text(1)), INTERRUPT)
    assert newer.state == pb.RUN_STATE_QUEUED
    interrupted = await observed(stub, active.run_id)
    assert payloads(interrupted.events)[-1] == "abort"
    abort = interrupted.events[-1].abort
    assert abort.interrupted_by_run_id == newer.run_id and not abort.rolled_back
    assert abort.reason == f"interrupted by run {newer.run_id}"
    assert text_of((await observed(stub, newer.run_id)).events) == "history=1 t0 done"
    # The interrupted run completed its model response (a tool call), not the tool.
    assert shape(await messages(stub, thread_id)) == [
        (active.run_id, REQUEST, ["user_prompt"]),
        (active.run_id, RESPONSE, ["text", "tool_call"]),
        (newer.run_id, REQUEST, ["user_prompt"]),
        (newer.run_id, RESPONSE, ["text"]),
    ]
    run = (await stub.GetRun(pb.GetRunRequest(run_id=active.run_id))).run
    assert run.state == pb.RUN_STATE_CANCELLED


async def test_rollback_leaves_the_thread_exactly_as_before_the_rolled_back_run(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    await turn(stub, thread_id, script(record("k"), text(2)))
    before = await messages(stub, thread_id)
    active = await start(stub, thread_id, script(text(1), record("again"), SLOW))
    await until_event(stub, active.run_id, "tool_result")
    newer = await start(stub, thread_id, script(ECHO, text(1)), ROLLBACK)
    rolled_back = await observed(stub, active.run_id)
    abort = rolled_back.events[-1].abort
    assert (abort.interrupted_by_run_id, abort.rolled_back) == (newer.run_id, True)
    assert text_of((await observed(stub, newer.run_id)).events) == "history=1 t0 done"
    after = await messages(stub, thread_id)
    assert after[: len(before)] == before
    assert {m.run_id for m in after[len(before) :]} == {newer.run_id}


@pytest.mark.executors
async def test_interrupting_a_suspended_run_cancels_it_and_keeps_its_request(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    active = await start(stub, thread_id, script(text(1), APPROVE))
    await until_event(stub, active.run_id, "suspended")
    newer = await start(stub, thread_id, script(ECHO), INTERRUPT)
    ended = await observed(stub, active.run_id)
    assert payloads(ended.events)[-2:] == ["suspended", "abort"]
    assert ended.events[-1].abort.interrupted_by_run_id == newer.run_id
    assert text_of((await observed(stub, newer.run_id)).events) == "history=1 done"
    assert shape(await messages(stub, thread_id))[:2] == [
        (active.run_id, REQUEST, ["user_prompt"]),
        (active.run_id, RESPONSE, ["text", "tool_call"]),
    ]


@pytest.mark.executors
async def test_cancelling_a_queued_run_takes_it_out_of_the_queue(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    active = await start(stub, thread_id, script(SLOW))
    doomed = await start(stub, thread_id, script(text(1)), ENQUEUE)
    kept = await start(stub, thread_id, script(ECHO), ENQUEUE)
    cancelled = await stub.CancelRun(pb.CancelRunRequest(run_id=doomed.run_id, reason="typo"))
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    assert payloads((await observed(stub, doomed.run_id)).events) == ["abort"]
    thread = (await stub.GetThread(pb.GetThreadRequest(thread_id=thread_id))).thread
    assert (thread.active_run_id, list(thread.queued_run_ids)) == (active.run_id, [kept.run_id])
    assert text_of((await observed(stub, kept.run_id)).events) == "history=1 done"
    assert doomed.run_id not in {m.run_id for m in await messages(stub, thread_id)}


# -- what each ending leaves in the thread -------------------------------------


@pytest.mark.parametrize(
    ("steps", "state", "expected"),
    [
        ([text(2)], pb.RUN_STATE_SUCCEEDED, [(REQUEST, ["user_prompt"]), (RESPONSE, ["text"])]),
        (
            [record("k"), {"error": "boom"}],
            pb.RUN_STATE_FAILED,
            [
                (REQUEST, ["user_prompt"]),
                (RESPONSE, ["tool_call"]),
                (REQUEST, ["tool_result"]),
            ],
        ),
        ([{"error": "boom"}], pb.RUN_STATE_FAILED, [(REQUEST, ["user_prompt"])]),
        (
            [{"tool": "fail", "args": {"message": "nope"}}, text(1)],
            pb.RUN_STATE_SUCCEEDED,
            [
                (REQUEST, ["user_prompt"]),
                (RESPONSE, ["tool_call"]),
                (REQUEST, ["retry"]),
                (RESPONSE, ["text"]),
            ],
        ),
    ],
    ids=["finished", "failed-after-a-step", "failed-in-its-first-step", "tool-retry"],
)
async def test_an_ended_run_leaves_its_documented_messages(
    stub: pb_grpc.AgentServiceStub,
    steps: list[dict[str, Any]],
    state: int,
    expected: list[tuple[int, list[str]]],
) -> None:
    thread_id = await new_thread(stub)
    out = await turn(stub, thread_id, script(*steps))
    run = (await stub.GetRun(pb.GetRunRequest(run_id=out.run_id))).run
    assert run.state == state
    listed = await messages(stub, thread_id)
    assert [(kind, parts) for _, kind, parts in shape(listed)] == expected
    assert {m.run_id for m in listed} <= {out.run_id}
    # Whatever it left, the next turn starts from it.
    nxt = await turn(stub, thread_id, script(ECHO))
    assert text_of(nxt.events) == "history=1 done"


async def test_a_run_interrupted_in_its_first_response_leaves_its_prompt(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    active = await start(stub, thread_id, script(SLOW))
    await until_event(stub, active.run_id, "text_delta")
    newer = await start(stub, thread_id, script(ECHO), INTERRUPT)
    assert text_of((await observed(stub, newer.run_id)).events) == "history=1 done"
    listed = await messages(stub, thread_id)
    assert shape(listed)[0] == (active.run_id, REQUEST, ["user_prompt"])
    assert listed[0].parts[0].user_prompt.text == script(SLOW)
    assert {m.run_id for m in listed[1:]} == {newer.run_id}


async def test_a_run_cancelled_during_a_tool_call_leaves_its_last_checkpoint(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    slow_tool = {"tool": "record", "args": {"key": "k", "delay_ms": 5000}}
    run = await start(stub, thread_id, script(text(1), slow_tool))
    await until_event(stub, run.run_id, "tool_call")
    cancelled = await stub.CancelRun(pb.CancelRunRequest(run_id=run.run_id, reason="stop"))
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    assert shape(await messages(stub, thread_id)) == [
        (run.run_id, REQUEST, ["user_prompt"]),
        (run.run_id, RESPONSE, ["text", "tool_call"]),
    ]
    # A history that ends on a call that never ran is still one the next run can use.
    assert text_of((await turn(stub, thread_id, script(ECHO))).events) == "history=1 done"


async def test_a_suspended_run_keeps_its_thread_and_adds_its_messages_once_it_ends(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    run = await start(stub, thread_id, script(APPROVE, text(1)))
    await until_event(stub, run.run_id, "suspended")
    thread = (await stub.GetThread(pb.GetThreadRequest(thread_id=thread_id))).thread
    assert (thread.active_run_id, thread.message_count) == (run.run_id, 0)
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await start(stub, thread_id, script(text(1)))
    assert error_info(busy.value).reason == "THREAD_BUSY"
    pending = (await stub.GetRun(pb.GetRunRequest(run_id=run.run_id))).run.pending_interrupts
    out = await resume(stub, run.run_id, approve(pending[0].tool_call_id))
    assert payloads(out.events)[-1] == "finish"
    assert [(kind, parts) for _, kind, parts in shape(await messages(stub, thread_id))] == [
        (REQUEST, ["user_prompt"]),
        (RESPONSE, ["tool_call"]),
        (REQUEST, ["tool_result"]),
        (RESPONSE, ["text"]),
    ]


# -- the thread resource --------------------------------------------------------


async def test_create_thread_is_idempotent_by_request_id_and_ids_are_unique(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    first = await stub.CreateThread(
        pb.CreateThreadRequest(resource_id="u", metadata={"a": "1"}, request_id="req-t1")
    )
    again = await stub.CreateThread(
        pb.CreateThreadRequest(resource_id="u", metadata={"a": "1"}, request_id="req-t1")
    )
    assert first.thread == again.thread
    assert dict(first.thread.metadata) == {"a": "1"} and first.thread.request_id == "req-t1"
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await stub.CreateThread(pb.CreateThreadRequest(resource_id="v", request_id="req-t1"))
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(reused.value).reason == "REQUEST_ID_REUSED"
    named = await stub.CreateThread(pb.CreateThreadRequest(thread_id="my-chat.1"))
    assert named.thread.thread_id == "my-chat.1"
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await stub.CreateThread(pb.CreateThreadRequest(thread_id="my-chat.1"))
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(taken.value).reason == "THREAD_ALREADY_EXISTS"


async def test_list_threads_by_resource_newest_first_with_bound_page_tokens(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    mine = [await new_thread(stub, resource_id="user:ann@example.com") for _ in range(3)]
    await new_thread(stub, resource_id="user:bob")
    page = await stub.ListThreads(
        pb.ListThreadsRequest(resource_id="user:ann@example.com", page_size=2)
    )
    rest = await stub.ListThreads(
        pb.ListThreadsRequest(
            resource_id="user:ann@example.com", page_size=2, page_token=page.next_page_token
        )
    )
    listed = [t.thread_id for t in [*page.threads, *rest.threads]]
    assert sorted(listed) == sorted(mine) and rest.next_page_token == ""
    created = [t.create_time.ToNanoseconds() for t in [*page.threads, *rest.threads]]
    assert created == sorted(created, reverse=True)
    with pytest.raises(grpc.aio.AioRpcError) as other_filter:
        await stub.ListThreads(
            pb.ListThreadsRequest(resource_id="user:bob", page_token=page.next_page_token)
        )
    assert other_filter.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_thread_refuses_while_busy_then_deletes_the_history(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread_id = await new_thread(stub)
    run = await start(stub, thread_id, script(SLOW))
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await stub.DeleteThread(pb.DeleteThreadRequest(thread_id=thread_id))
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(busy.value).metadata["active_run_id"] == run.run_id
    await observed(stub, run.run_id)
    await stub.DeleteThread(pb.DeleteThreadRequest(thread_id=thread_id))
    for call in (
        lambda: stub.GetThread(pb.GetThreadRequest(thread_id=thread_id)),
        lambda: stub.ListThreadMessages(pb.ListThreadMessagesRequest(thread_id=thread_id)),
        lambda: stub.DeleteThread(pb.DeleteThreadRequest(thread_id=thread_id)),
        lambda: start(stub, thread_id, script(text(1))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await call()
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(gone.value).reason == "THREAD_NOT_FOUND"
    # The run itself is still there, until its own retention passes.
    kept = (await stub.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
    assert kept.thread_id == thread_id


async def test_a_thread_may_hold_runs_of_different_agents(
    start_keel: Callable[..., Any],
) -> None:
    keel: Keel = await start_keel(agents="tests.registries:options")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        thread_id = await new_thread(stub)
        await turn(stub, thread_id, script(text(1)))
        other = await collect(
            stub.Stream(
                pb.StreamRequest(agent_id="scripted-brief", input=script(ECHO), thread_id=thread_id)
            )
        )
        assert text_of(other.events) == "history=1 done"


async def test_an_idle_thread_expires_after_its_idle_time_and_a_busy_one_does_not(
    start_keel: Callable[..., Any],
) -> None:
    keel: Keel = await start_keel(thread_idle_ttl_s=1.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        idle, busy = await new_thread(stub), await new_thread(stub)
        run = await start(stub, busy, script(text(60, delay_ms=25)))  # about 1.5 s
        await asyncio.sleep(1.2)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await stub.GetThread(pb.GetThreadRequest(thread_id=idle))
        assert expired.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(expired.value).reason == "THREAD_NOT_FOUND"
        assert (await stub.GetThread(pb.GetThreadRequest(thread_id=busy))).thread.active_run_id
        await observed(stub, run.run_id)
        assert (await stub.GetThread(pb.GetThreadRequest(thread_id=busy))).thread.message_count
        await asyncio.sleep(1.5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetThread(pb.GetThreadRequest(thread_id=busy))
