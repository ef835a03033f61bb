"""keel_client.sync against a real Keel server: blocking calls, a plain `for` over events.

The server runs in the test's event loop (the `keel` fixture, both backends),
so the blocking code runs in a thread of its own (`blocking`) while the loop
keeps serving; the sync client's own loop is a third thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel_client import Reconnect
from keel_client.sync import KeelClient

from server.app import Keel
from tests.integration.conftest import assert_contiguous, payloads, record, script, text, text_of
from tests.processes import start_keel_process

T = TypeVar("T")
# Fast reconnects, and a bound on them: a test whose server is gone fails, never spins.
FAST = {"initial_backoff_s": 0.02, "max_backoff_s": 0.5, "max_reconnects": 20}
BLOCKING_TIMEOUT_S = 60.0


async def blocking(code: Callable[[], T], timeout_s: float = BLOCKING_TIMEOUT_S) -> T:
    """Run blocking `code` in a daemon thread while this loop keeps serving; fail after timeout_s.

    Not asyncio.to_thread: a worker stuck in a blocking call would hang the
    loop's shutdown (it joins its executor's threads) and with it the test
    session, where a daemon thread is simply left behind.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = code()
        except BaseException as error:
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="blocking test code", daemon=True).start()
    return await asyncio.wait_for(done, timeout_s)


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("keel-client ")]


async def test_sync_iterator_yields_every_event_of_a_run_once_in_order(keel: Keel) -> None:
    def read() -> tuple[list[pb.AgentEvent], pb.Run]:
        with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
            handle = client.stream("scripted", script(text(30), record("k"), text(10)))
            events = list(handle.events())
            assert handle.run_id is not None
            assert handle.next_offset == len(events)
            return events, client.get_run(handle.run_id)

    events, run = await blocking(read)

    assert_contiguous(events)
    assert payloads(events)[0] == "start" and payloads(events)[-1] == "finish"
    assert text_of(events).startswith("".join(f"t{i} " for i in range(40)))
    assert run.state == pb.RUN_STATE_SUCCEEDED and run.next_offset == len(events)


async def test_sync_reader_that_breaks_resumes_at_next_offset_on_another_client(
    keel: Keel,
) -> None:
    target = f"127.0.0.1:{keel.port}"

    def read() -> list[pb.AgentEvent]:
        with KeelClient(target, **FAST) as first:
            handle = first.stream("scripted", script(text(60, delay_ms=5)))
            seen: list[pb.AgentEvent] = []
            for event in handle.events():
                seen.append(event)
                if len(seen) == 10:
                    break  # closes the iterator: the call is cancelled, the run goes on
            assert handle.next_offset == 10 and handle.run_id is not None
            run_id = handle.run_id
        with KeelClient(target, **FAST) as second:
            seen.extend(second.run(run_id).events(from_offset=10))
        return seen

    events = await blocking(read)

    assert_contiguous(events)
    assert payloads(events)[-1] == "finish"
    assert text_of(events).startswith("".join(f"t{i} " for i in range(60)))


async def test_sync_unary_helpers_return_protos_and_raise_rpc_errors(keel: Keel) -> None:
    def use() -> None:
        with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
            started = client.start_run("scripted", script(text(1000, delay_ms=10)), request_id="r1")
            again = client.start_run("scripted", script(text(1000, delay_ms=10)), request_id="r1")
            assert again.run_id == started.run_id
            page = client.list_runs("scripted", states=[pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING])
            assert started.run_id in [run.run_id for run in page.runs]
            client.cancel_run(started.run_id, reason="enough")
            events = list(client.run(started.run_id).events())
            assert_contiguous(events)
            assert payloads(events)[-1] == "abort"
            assert client.get_run(started.run_id).state == pb.RUN_STATE_CANCELLED
            assert "scripted" in [agent.agent_id for agent in client.list_agents()]
            with pytest.raises(grpc.RpcError) as raised:
                client.get_run("0123456789abcdef0123456789abcdef")
            assert isinstance(raised.value, grpc.aio.AioRpcError)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    await blocking(use)


async def test_sync_close_joins_its_thread_and_is_safe_twice(keel: Keel) -> None:
    before = len(_client_threads())

    def use() -> None:
        client = KeelClient(f"127.0.0.1:{keel.port}", **FAST)
        assert len(_client_threads()) == before + 1
        assert client.list_agents()
        events = client.run("0123456789abcdef0123456789abcdef").events()
        client.close()
        client.close()
        assert len(_client_threads()) == before
        with pytest.raises(RuntimeError, match="closed"):
            client.list_agents()
        with pytest.raises(RuntimeError, match="closed"):
            next(events)

    await blocking(use)


async def test_sync_stream_resumes_on_another_server_when_its_server_drains(
    redis_url: str, key_prefix: str
) -> None:
    """SIGTERM the server a sync iterator reads from: it goes on, on the other process."""
    env = {"KEEL_SHUTDOWN_GRACE_S": "30", "KEEL_HEARTBEAT_INTERVAL_S": "0.2"}
    a = await start_keel_process(redis_url=redis_url, key_prefix=key_prefix, env=env)
    b = await start_keel_process(redis_url=redis_url, key_prefix=key_prefix, env=env)
    pid_a = a.process.pid

    def read() -> tuple[list[pb.AgentEvent], list[Reconnect]]:
        # One channel over both addresses: pick_first uses A, and B once A is gone.
        with KeelClient(f"ipv4:{a.target},{b.target}", **FAST) as client:
            handle = client.stream("scripted", script(text(150, delay_ms=10), record("k")))
            events = []
            for event in handle.events():
                events.append(event)
                if len(events) == 40:
                    os.kill(pid_a, signal.SIGTERM)
            return events, handle.reconnects

    try:
        events, reconnects = await blocking(read)
        assert reconnects, "the stream never moved to the second server"
        assert all(r.rpc == "Observe" for r in reconnects)
        assert_contiguous(events)
        assert payloads(events)[-1] == "finish"
        assert text_of(events).startswith("".join(f"t{i} " for i in range(150)))
        assert await a.wait() == 0
    finally:
        for process in (a, b):
            process.kill()
            await process.wait()


async def test_sync_client_approves_inside_a_plain_for_loop(keel: Keel) -> None:
    def read() -> list[pb.AgentEvent]:
        with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
            steps = script(text(4), {"tool": "approve_me", "args": {"y": 2}}, text(2))
            handle = client.stream("scripted", steps)
            events = []
            for event in handle.events():
                events.append(event)
                if event.WhichOneof("payload") == "tool_call_approval":
                    snapshot = handle.approve(event.tool_call_approval.tool_call_id)
                    assert snapshot.run.run_id == handle.run_id
            return events

    events = await blocking(read)

    assert_contiguous(events)
    kinds = payloads(events)
    assert "suspended" in kinds and "resumed" in kinds and kinds[-1] == "finish"
