"""Catch-up under load: bounded page reads, shared pages, and no slot held by a slow client.

Real servers on both backends. The log's `read` is wrapped (pytest's monkeypatch
on the server's own EventLog, which it then still calls) to count the reads in
flight and where they start; nothing of Redis or gRPC is replaced. No timing is
asserted: every check is an invariant of what was read and what was received.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

from server.app import Keel
from server.events.log import EventLog
from tests.integration.conftest import assert_contiguous, collect, payloads, script, text

Read = Callable[[str, int, int], Awaitable[list[pb.AgentEvent]]]


class CountedReads:
    """Wraps an EventLog's read: how many are in flight (and the most ever), and their offsets.

    With `gate`, reads wait for it to be set before they go on to the log.
    """

    def __init__(self, log: EventLog, run_id: str, gate: asyncio.Event | None = None) -> None:
        self._read: Read = log.read
        self._run_id = run_id
        self._gate = gate
        self.in_flight = 0
        self.peak = 0
        self.offsets: list[int] = []  # of this run's reads, in the order they were made

    async def read(self, run_id: str, offset: int, limit: int) -> list[pb.AgentEvent]:
        if run_id != self._run_id:
            return await self._read(run_id, offset, limit)
        self.offsets.append(offset)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self._gate is not None:
                await self._gate.wait()
            return await self._read(run_id, offset, limit)
        finally:
            self.in_flight -= 1


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _metric_of(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _run_to_end(stub: pb_grpc.AgentServiceStub, steps: str) -> str:
    """Start a run and wait for its end without reading its events (nothing is shared yet)."""
    run_id: str = (
        await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=steps))
    ).run.run_id
    while (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.state != pb.RUN_STATE_SUCCEEDED:
        await asyncio.sleep(0.01)
    return run_id


async def _head(stub: pb_grpc.AgentServiceStub, run_id: str) -> int:
    return int((await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.next_offset)


async def test_catch_up_reads_in_flight_never_exceed_catch_up_concurrency(
    start_keel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve observers join a live run at once, each in a page of its own: while the
    first reads are held back until every observer reads or waits for a slot, never
    more than two reads are in flight; then every observer gets every event once."""
    keel: Keel = await start_keel(catch_up_concurrency=2, catch_up_page_size=10)
    observers = 12
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        # 200 deltas at once, then a live tail the observers join during.
        steps = script(text(200), text(150, delay_ms=5))
        run_id = (
            await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=steps))
        ).run.run_id
        tail = stub.Observe(pb.ObserveRequest(run_id=run_id, offset=150))
        while (await tail.read()).WhichOneof("kind") != "events":
            pass  # event 150 exists: the history is written, pages 0-14 are whole
        tail.cancel()
        gate = asyncio.Event()
        reads = CountedReads(keel.log, run_id, gate)
        monkeypatch.setattr(keel.log, "read", reads.read)
        waited_before = _metric("keel_catch_up_reads_waited_total")

        async def open_gate() -> None:
            # Every observer's first read is held at the gate or waits for a slot.
            while reads.in_flight + _metric("keel_catch_up_reads_waiting") < observers:
                await asyncio.sleep(0.005)
            gate.set()

        offsets = [10 * i + 3 for i in range(observers)]  # a page each: nothing shared yet
        async with asyncio.timeout(90):  # a hang guard, not a measurement
            opener = asyncio.create_task(open_gate())
            calls = [stub.Observe(pb.ObserveRequest(run_id=run_id, offset=o)) for o in offsets]
            results = await asyncio.gather(*(collect(call) for call in calls))
            await opener
    assert reads.peak == 2
    assert _metric("keel_catch_up_reads_waited_total") - waited_before >= observers - 2
    for offset, result in zip(offsets, results, strict=True):
        assert_contiguous(result.events, start=offset)
        assert payloads(result.events)[-1] == "finish"


async def test_catch_up_observers_of_one_run_read_each_whole_page_once(
    start_keel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty observers replay one ended run of 200 events (20 pages of 10) at once:
    the log is read 20 times between them, not 400, and each gets the whole run."""
    keel: Keel = await start_keel(catch_up_concurrency=2, catch_up_page_size=10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        run_id = await _run_to_end(stub, script(text(192)))  # 192 deltas + 8 = 200 events
        assert await _head(stub, run_id) == 200
        reads = CountedReads(keel.log, run_id)
        monkeypatch.setattr(keel.log, "read", reads.read)
        shared_before = _metric("keel_catch_up_pages_shared_total")
        results = await asyncio.gather(
            *(collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0))) for _ in range(20))
        )
        # A late observer joining mid-page gets the rest of that shared page.
        late = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=37)))
    assert sorted(reads.offsets) == list(range(0, 200, 10))  # each whole page read once
    # Every other observer took each page from the one that read it; the late one too.
    assert _metric("keel_catch_up_pages_shared_total") - shared_before == 20 * 19 + 17
    for result in results:
        assert_contiguous(result.events)
        assert len(result.events) == 200 and payloads(result.events)[-1] == "finish"
    assert_contiguous(late.events, start=37)
    assert [e.SerializeToString() for e in late.events] == [
        e.SerializeToString() for e in results[0].events[37:]
    ]


async def test_a_client_that_stops_reading_holds_no_catch_up_slot(
    start_keel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one catch-up slot, an observer whose client stops reading (its sends wait on
    flow control for good) leaves the slot free: another observer replays the whole run."""
    keel: Keel = await start_keel(catch_up_concurrency=1, catch_up_page_size=10)
    target = f"127.0.0.1:{keel.port}"
    # Without BDP probing the stalled client's window stays at 64 KiB: its stream blocks
    # after some hundred events, far from the end (with it, gRPC would take them all in).
    stalling = grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)])
    async with stalling, grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        run_id = await _run_to_end(stub, script(text(5000)))
        total = await _head(stub, run_id)
        reads = CountedReads(keel.log, run_id)
        monkeypatch.setattr(keel.log, "read", reads.read)
        served_before = _metric_of("keel_events_served_total", source="log")
        stalled = pb_grpc.AgentServiceStub(stalling).Observe(
            pb.ObserveRequest(run_id=run_id, offset=0)
        )
        assert (await stalled.read()).WhichOneof("kind") == "snapshot"  # and nothing more
        while not reads.offsets:  # the stalled observer is catching up
            await asyncio.sleep(0.005)
        async with asyncio.timeout(90):  # a hang guard, not a measurement
            replay = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0)))
        served = _metric_of("keel_events_served_total", source="log") - served_before
        stalled.cancel()
    assert_contiguous(replay.events)
    assert len(replay.events) == total and payloads(replay.events)[-1] == "finish"
    assert served < 2 * total  # the stalled stream was stuck before the end all along


async def test_shared_pages_end_a_stop_at_suspend_stream_right_after_its_suspension(
    start_keel: Any,
) -> None:
    """A run that suspended and went on, replayed from shared pages of 4 events: streams
    with stop_at_suspend end right after the `suspended` event, the others get the run."""
    keel: Keel = await start_keel(catch_up_concurrency=2, catch_up_page_size=4)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        approve_me = {"tool": "approve_me", "args": {"action": "deploy"}}
        steps = script(text(3), approve_me, text(9))
        run_id = (
            await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=steps))
        ).run.run_id
        while (run := (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run).state != (
            pb.RUN_STATE_SUSPENDED
        ):
            await asyncio.sleep(0.01)
        [pending] = run.pending_interrupts
        decision = pb.Decision(tool_call_id=pending.tool_call_id, approve=pb.Approve())
        await collect(stub.Resume(pb.ResumeRequest(run_id=run_id, decisions=[decision])))
        total = await _head(stub, run_id)

        def observe(offset: int, stop: bool) -> Any:
            request = pb.ObserveRequest(run_id=run_id, offset=offset, stop_at_suspend=stop)
            return collect(stub.Observe(request))

        stopping = await asyncio.gather(*(observe(o, True) for o in range(6)))
        following = await asyncio.gather(*(observe(o, False) for o in range(6)))
    suspended_at = payloads(following[0].events).index("suspended")
    assert suspended_at + 1 < total  # the suspension is inside the log, not at its end
    for offset, (stopped, followed) in enumerate(zip(stopping, following, strict=True)):
        assert_contiguous(stopped.events, start=offset)
        assert stopped.events[-1].index == suspended_at
        assert payloads(stopped.events)[-1] == "suspended"
        assert_contiguous(followed.events, start=offset)
        assert len(followed.events) == total - offset
        assert payloads(followed.events)[-1] == "finish"
