"""keel_client's threads (conversations) against a real Keel server, both backends.

A run made on a thread starts with the thread's messages and adds its own
when it ends; the scripted agent's `echo_history` step says how many earlier
user prompts its run started with ("history=N "), so a reply shows which
turns the run saw. The blocking client's helpers run in a thread of their
own (`blocking`, as in test_client_sync.py) while the test's loop serves.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel_client import KeelClient, RunHandle
from keel_client import sync as blocking_client

from server.app import Keel
from tests.integration.conftest import assert_contiguous, payloads, script, text, text_of
from tests.integration.test_client_sync import blocking

FAST: dict[str, Any] = {"initial_backoff_s": 0.02, "max_backoff_s": 0.5, "max_reconnects": 20}
ECHO = {"echo_history": True}
TURN = script(ECHO, text(3))  # replies "history=N t0 t1 t2 done"
SLOW = script(ECHO, text(400, delay_ms=10))  # busy for about 4 s unless cancelled
REQUEST, RESPONSE = pb.MESSAGE_KIND_REQUEST, pb.MESSAGE_KIND_RESPONSE


def reply(n: int) -> str:
    return f"history={n} t0 t1 t2 done"


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of an error's rich status details."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in the status details of {error}")


def assert_thread_busy(error: grpc.RpcError, thread_id: str, active_run_id: str) -> None:
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    info = error_info(error)
    assert info.reason == "THREAD_BUSY"
    assert info.metadata["active_run_id"] == active_run_id
    assert info.metadata["thread_id"] == thread_id


async def read(handle: RunHandle) -> list[pb.AgentEvent]:
    return [event async for event in handle.events()]


async def first_event(handle: RunHandle) -> pb.AgentEvent:
    """The handle's next event; then the call is cancelled (the run goes on)."""
    async with contextlib.aclosing(handle.events()) as events:
        return await anext(events)


def assert_turns_in_messages(messages: list[pb.ThreadMessage], run_ids: list[str]) -> None:
    """One REQUEST (the turn's input) and one RESPONSE (its reply) per turn, in order."""
    assert [m.index for m in messages] == list(range(2 * len(run_ids)))
    assert [m.run_id for m in messages] == [run_id for run_id in run_ids for _ in range(2)]
    assert [m.kind for m in messages] == [REQUEST, RESPONSE] * len(run_ids)
    for turn, (asked, answered) in enumerate(zip(messages[::2], messages[1::2], strict=True)):
        assert [p.WhichOneof("part") for p in asked.parts] == ["user_prompt"]
        assert asked.parts[0].user_prompt.text == TURN
        assert [p.WhichOneof("part") for p in answered.parts] == ["text"]
        assert answered.parts[0].text.text == reply(turn)
        assert asked.create_time.ToNanoseconds() <= answered.create_time.ToNanoseconds()


async def wait_until_running(client: KeelClient, run_id: str) -> None:
    async with asyncio.timeout(10):
        while (await client.get_run(run_id)).state != pb.RUN_STATE_RUNNING:
            await asyncio.sleep(0.01)


# The asyncio client.


async def test_three_turns_sent_on_a_thread_each_see_the_turns_before(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        thread = await client.create_thread(resource_id="user-1", metadata={"title": "chat"})
        assert thread.thread_id and thread.resource_id == "user-1"
        assert dict(thread.metadata) == {"title": "chat"} and thread.message_count == 0

        run_ids: list[str] = []
        for turn in range(3):
            handle = client.send(thread.thread_id, "scripted", TURN)
            events = await read(handle)
            assert_contiguous(events)
            assert payloads(events)[-1] == "finish"
            assert text_of(events) == reply(turn)
            assert handle.snapshot is not None
            assert handle.snapshot.run.thread_id == thread.thread_id
            assert handle.run_id is not None
            run_ids.append(handle.run_id)

        got = await client.get_thread(thread.thread_id)
        assert got.message_count == 6 and not got.active_run_id and not got.queued_run_ids
        assert got.resource_id == "user-1" and dict(got.metadata) == {"title": "chat"}
        runs = await client.list_runs(thread_id=thread.thread_id)
        assert [run.run_id for run in runs.runs] == run_ids[::-1]  # newest first
        assert {run.thread_id for run in runs.runs} == {thread.thread_id}
        assert len(set(run_ids)) == 3

        messages = [m async for m in client.thread_messages(thread.thread_id)]
        assert_turns_in_messages(messages, run_ids)


async def test_thread_messages_page_oldest_or_newest_first(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        thread = await client.create_thread()
        run_ids = []
        for _turn in range(3):
            run = await client.start_run("scripted", TURN, thread_id=thread.thread_id)
            assert run.thread_id == thread.thread_id
            await read(client.run(run.run_id))  # to its end: its messages joined the thread
            run_ids.append(run.run_id)

        first = await client.list_thread_messages(thread.thread_id, page_size=4)
        assert [m.index for m in first.messages] == [0, 1, 2, 3] and first.next_page_token
        rest = await client.list_thread_messages(
            thread.thread_id, page_size=4, page_token=first.next_page_token
        )
        assert [m.index for m in rest.messages] == [4, 5] and not rest.next_page_token
        assert_turns_in_messages([*first.messages, *rest.messages], run_ids)

        latest = await client.list_thread_messages(thread.thread_id, page_size=2, newest_first=True)
        assert [m.index for m in latest.messages] == [5, 4]
        assert [m.run_id for m in latest.messages] == [run_ids[2]] * 2
        # The iterator follows the pages; a token of one order is not valid for the other.
        newest = client.thread_messages(thread.thread_id, page_size=2, newest_first=True)
        assert [m.index async for m in newest] == [5, 4, 3, 2, 1, 0]
        oldest = client.thread_messages(thread.thread_id, page_size=1)
        assert [m.index async for m in oldest] == [0, 1, 2, 3, 4, 5]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.list_thread_messages(thread.thread_id, page_token=latest.next_page_token)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_busy_thread_rejects_a_turn_with_thread_busy_and_the_active_run(
    keel: Keel,
) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        thread = await client.create_thread()
        active = await client.start_run("scripted", SLOW, thread_id=thread.thread_id)
        await wait_until_running(client, active.run_id)

        # REJECT is the default: the handle's first iteration raises, and is not retried.
        rejected = client.send(thread.thread_id, "scripted", TURN)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read(rejected)
        assert_thread_busy(raised.value, thread.thread_id, active.run_id)
        assert rejected.run_id is None and not rejected.reconnects
        explicit = client.stream(
            "scripted",
            TURN,
            thread_id=thread.thread_id,
            busy_policy=pb.THREAD_BUSY_POLICY_REJECT,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read(explicit)
        assert_thread_busy(raised.value, thread.thread_id, active.run_id)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.start_run("scripted", TURN, thread_id=thread.thread_id)
        assert_thread_busy(raised.value, thread.thread_id, active.run_id)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.delete_thread(thread.thread_id)
        assert_thread_busy(raised.value, thread.thread_id, active.run_id)
        assert (await client.get_thread(thread.thread_id)).active_run_id == active.run_id

        # Once the active run has ended, the thread takes turns and can be deleted.
        await client.cancel_run(active.run_id, reason="enough")
        events = await read(client.send(thread.thread_id, "scripted", TURN))
        assert text_of(events) == reply(1)  # the cancelled run left its prompt
        await client.delete_thread(thread.thread_id)


async def test_the_same_request_id_on_a_busy_thread_joins_its_own_run(keel: Keel) -> None:
    """What the handle's retries of a dropped Stream rely on: no THREAD_BUSY from their own run."""
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        thread = await client.create_thread()
        first = client.send(thread.thread_id, "scripted", SLOW, request_id="turn-1")
        await first_event(first)  # the run is active on the thread
        again = client.send(thread.thread_id, "scripted", SLOW, request_id="turn-1")
        await first_event(again)
        assert first.run_id is not None and again.run_id == first.run_id
        started = await client.start_run(
            "scripted", SLOW, thread_id=thread.thread_id, request_id="turn-1"
        )
        assert started.run_id == first.run_id
        await client.cancel_run(first.run_id)


async def test_enqueued_turns_wait_for_the_active_run_and_see_its_messages(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        thread = await client.create_thread()
        active = client.send(thread.thread_id, "scripted", script(ECHO, text(100, delay_ms=10)))
        enqueue = pb.THREAD_BUSY_POLICY_ENQUEUE
        queued = [
            client.send(thread.thread_id, "scripted", TURN, busy_policy=enqueue) for _ in range(2)
        ]
        readers = []
        for handle in [active, *queued]:  # one after the other: their order on the thread
            readers.append(asyncio.create_task(read(handle)))
            async with asyncio.timeout(10):
                while handle.run_id is None:
                    await asyncio.sleep(0.01)
        assert all(h.snapshot and h.snapshot.run.state == pb.RUN_STATE_QUEUED for h in queued)
        got = await client.get_thread(thread.thread_id)
        assert got.active_run_id == active.run_id
        assert list(got.queued_run_ids) == [h.run_id for h in queued]

        done = await asyncio.gather(*readers)
        for events in done:
            assert_contiguous(events)
            assert payloads(events)[-1] == "finish"
        assert text_of(done[0]).startswith("history=0 t0 t1 ")
        assert [text_of(events) for events in done[1:]] == [reply(1), reply(2)]
        got = await client.get_thread(thread.thread_id)
        assert got.message_count == 6 and not got.active_run_id and not got.queued_run_ids


async def test_get_thread_shows_the_active_run_and_the_queue(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        thread = await client.create_thread()
        active = await client.start_run("scripted", SLOW, thread_id=thread.thread_id)
        enqueue = pb.THREAD_BUSY_POLICY_ENQUEUE
        waiting = [
            await client.start_run(
                "scripted", TURN, thread_id=thread.thread_id, busy_policy=enqueue
            )
            for _ in range(2)
        ]
        got = await client.get_thread(thread.thread_id)
        assert got.active_run_id == active.run_id
        assert list(got.queued_run_ids) == [run.run_id for run in waiting]
        assert {run.state for run in waiting} == {pb.RUN_STATE_QUEUED}

        await client.cancel_run(active.run_id)
        last = await read(client.run(waiting[1].run_id))
        assert text_of(last) == reply(2)  # the cancelled run's prompt, then the first queued turn


async def test_threads_are_listed_by_resource_newest_first_and_deleted(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        for n in range(3):
            await client.create_thread(thread_id=f"chat-{n}", resource_id="alice")
            await asyncio.sleep(0.01)  # distinct creation times
        other = await client.create_thread(resource_id="bob")

        page = await client.list_threads("alice", page_size=2)
        assert [t.thread_id for t in page.threads] == ["chat-2", "chat-1"]
        assert page.next_page_token
        rest = await client.list_threads("alice", page_size=2, page_token=page.next_page_token)
        assert [t.thread_id for t in rest.threads] == ["chat-0"] and not rest.next_page_token
        everyone = await client.list_threads()
        assert {t.thread_id for t in everyone.threads} == {
            "chat-0",
            "chat-1",
            "chat-2",
            other.thread_id,
        }

        # Idempotent by request_id; a taken thread_id is ALREADY_EXISTS.
        once = await client.create_thread(resource_id="alice", request_id="create-1")
        twice = await client.create_thread(resource_id="alice", request_id="create-1")
        assert once.thread_id == twice.thread_id and once.request_id == "create-1"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.create_thread(thread_id="chat-0")
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error_info(raised.value).reason == "THREAD_ALREADY_EXISTS"

        await read(client.send("chat-1", "scripted", TURN))
        await client.delete_thread("chat-1")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.get_thread("chat-1")
        assert error_info(raised.value).reason == "THREAD_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.list_thread_messages("chat-1")
        assert error_info(raised.value).reason == "THREAD_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read(client.send("chat-1", "scripted", TURN))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(raised.value).reason == "THREAD_NOT_FOUND"
        remaining = await client.list_threads("alice")
        assert [t.thread_id for t in remaining.threads] == [once.thread_id, "chat-2", "chat-0"]


# The blocking client.


async def test_sync_client_holds_a_conversation_on_a_thread(keel: Keel) -> None:
    def converse() -> None:
        target = f"127.0.0.1:{keel.port}"
        with blocking_client.KeelClient(target, **FAST) as client:
            thread = client.create_thread(resource_id="carol", metadata={"k": "v"})
            assert client.get_thread(thread.thread_id).metadata["k"] == "v"
            assert [t.thread_id for t in client.list_threads("carol").threads] == [thread.thread_id]

            run_ids = []
            for turn in range(3):
                handle = client.send(thread.thread_id, "scripted", TURN)
                events = list(handle.events())
                assert_contiguous(events)
                assert text_of(events) == reply(turn)
                assert handle.run_id is not None
                run_ids.append(handle.run_id)
            messages = list(client.thread_messages(thread.thread_id, page_size=4))
            assert_turns_in_messages(messages, run_ids)
            page = client.list_thread_messages(thread.thread_id, page_size=1, newest_first=True)
            assert [m.index for m in page.messages] == [5] and page.next_page_token
            runs = client.list_runs(thread_id=thread.thread_id)
            assert [run.run_id for run in runs.runs] == run_ids[::-1]

            busy = script(ECHO, text(100, delay_ms=10))  # about 1 s
            active = client.start_run("scripted", busy, thread_id=thread.thread_id)
            with pytest.raises(grpc.RpcError) as raised:
                list(client.send(thread.thread_id, "scripted", TURN).events())
            assert_thread_busy(raised.value, thread.thread_id, active.run_id)
            with pytest.raises(grpc.RpcError) as raised:
                client.delete_thread(thread.thread_id)
            assert_thread_busy(raised.value, thread.thread_id, active.run_id)

            enqueue = pb.THREAD_BUSY_POLICY_ENQUEUE
            queued = client.send(thread.thread_id, "scripted", TURN, busy_policy=enqueue)
            events = list(queued.events())
            assert queued.snapshot is not None
            assert queued.snapshot.run.state == pb.RUN_STATE_QUEUED
            assert text_of(events) == reply(4)  # after the active run, the fourth turn
            assert client.get_run(active.run_id).state == pb.RUN_STATE_SUCCEEDED
            assert client.get_thread(thread.thread_id).message_count == 10

            client.delete_thread(thread.thread_id)
            with pytest.raises(grpc.RpcError) as raised:
                client.get_thread(thread.thread_id)
            assert isinstance(raised.value, grpc.aio.AioRpcError)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            assert not client.list_threads("carol").threads

    await blocking(converse)
