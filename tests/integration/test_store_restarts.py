"""Redis restarts under a streaming run, with a real redis-server killed with SIGKILL.

- With AOF (appendfsync always) a restart on the same files keeps every event:
  the run finishes and a client that resumes sees every event exactly once,
  though the store is a new incarnation.
- Restarted from an older RDB snapshot, the store holds only a prefix of the
  run's log and the run carries on from there, writing the lost indices
  again. A client that holds events past that prefix gets LOG_ROLLED_BACK
  (FAILED_PRECONDITION), never the rewritten events under indices it saw.
- Restarted empty, a run is gone: NOT_FOUND, not a stream that hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel_client import KeelClient, LogRolledBack

from server.app import Keel
from server.events.keys import Keys
from tests.conftest import DisposableRedis, _start_redis, _stop_redis
from tests.integration.conftest import payloads, script, text

AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
RDB_ONLY = ("--appendonly", "no")  # snapshots only when the test says SAVE
FOLLOW_TIMEOUT_S = 90.0
DELTAS = 600


@pytest.fixture
def backend() -> str:
    return "redis"


def persistent_redis(tmp_path: Path, persistence: tuple[str, ...]) -> DisposableRedis:
    process, url = _start_redis(tmp_path, persistence=persistence)
    return DisposableRedis(url, process, tmp_path, persistence)


@dataclass
class Follower:
    """A client that resumes like the wrappers do: from its next offset, naming the
    incarnation of its last event; every event it gets must be the next one."""

    run_id: str
    events: list[pb.AgentEvent] = field(default_factory=list)
    incarnation: str = ""
    incarnations: list[str] = field(default_factory=list)  # every one it was told, in order
    rolled_back: dict[str, str] | None = None  # LOG_ROLLED_BACK's metadata, if it came

    def take(self, response: pb.ObserveResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "snapshot":
            self.tell(response.snapshot.run.incarnation)
        elif kind == "heartbeat":
            self.tell(response.heartbeat.incarnation)
        elif kind == "events":
            for event in response.events.events:
                assert event.index == len(self.events), (event.index, len(self.events))
                self.events.append(event)

    def tell(self, incarnation: str) -> None:
        if incarnation and incarnation != self.incarnation:
            self.incarnation = incarnation
            self.incarnations.append(incarnation)

    async def follow(
        self, stub: pb_grpc.AgentServiceStub, on_event: Callable[[int], Any] | None = None
    ) -> None:
        """Observe to the run's end (or LOG_ROLLED_BACK), resuming after every failure."""
        async with asyncio.timeout(FOLLOW_TIMEOUT_S):
            while True:
                request = pb.ObserveRequest(
                    run_id=self.run_id, offset=len(self.events), incarnation=self.incarnation
                )
                try:
                    async for response in stub.Observe(request):
                        self.take(response)
                        if on_event is not None and response.WhichOneof("kind") == "events":
                            await on_event(len(self.events))
                    if self.events and payloads(self.events)[-1] == "finish":
                        return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        self.rolled_back = rolled_back_metadata(exc)
                        return
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                await asyncio.sleep(0.05)


def rolled_back_metadata(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.reason == "LOG_ROLLED_BACK", info
            return dict(info.metadata)
    raise AssertionError(f"no ErrorInfo in {exc}")


async def start_on(start_keel: Any, redis: DisposableRedis) -> Keel:
    keel: Keel = await start_keel(
        redis_url=redis.url,
        lease_ttl_s=1.0,
        sweep_interval_s=0.1,
        heartbeat_interval_s=0.1,
        health_check_interval_s=0.1,
    )
    return keel


async def start_run(stub: pb_grpc.AgentServiceStub) -> str:
    started = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(DELTAS, delay_ms=5)))
    )
    return started.run.run_id


async def test_with_aof_a_sigkilled_redis_restarted_on_its_files_loses_nothing(
    start_keel: Any, tmp_path: Path
) -> None:
    redis = persistent_redis(tmp_path, AOF_ALWAYS)
    try:
        keel = await start_on(start_keel, redis)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            run_id = await start_run(stub)
            follower = Follower(run_id)
            crashes: list[int] = []

            async def crash_at_100(received: int) -> None:
                if received >= 100 and not crashes:
                    crashes.append(received)
                    redis.kill()
                    redis.restart()

            await follower.follow(stub, crash_at_100)
            assert crashes
            assert follower.rolled_back is None
            assert payloads(follower.events)[-1] == "finish"
            # The owner lost its store mid-step: the step ran again from its checkpoint
            # (step_superseded), and its last attempt streamed the whole text.
            last = max(e.attempt for e in follower.events if e.HasField("text_delta"))
            final = [
                e.text_delta.delta
                for e in follower.events
                if e.HasField("text_delta") and e.attempt == last
            ]
            assert "".join(final).startswith("".join(f"t{i} " for i in range(DELTAS)))
            # A new incarnation wrote the events after the restart; nothing was flagged.
            run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
            assert len(follower.incarnations) == 2, follower.incarnations
            assert run.incarnation == follower.incarnations[-1]
    finally:
        _stop_redis(redis.process)


async def test_a_redis_restarted_from_an_older_snapshot_is_detected_not_replayed(
    start_keel: Any, tmp_path: Path
) -> None:
    """The issue's scenario: a snapshot at about event 100, 200 more events streamed to a
    client, SIGKILL, restart from the snapshot. The run carries on from the snapshot's
    head; the client, which holds 300 events, is told LOG_ROLLED_BACK."""
    redis = persistent_redis(tmp_path, RDB_ONLY)
    admin = aioredis.from_url(redis.url)
    try:
        keel = await start_on(start_keel, redis)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            run_id = await start_run(stub)
            follower = Follower(run_id)
            snapshot_head: list[int] = []

            async def snapshot_then_crash(received: int) -> None:
                if received >= 100 and not snapshot_head:
                    await admin.execute_command("SAVE")
                    head = await admin.hget(
                        Keys(keel.settings.key_prefix).run(run_id), "next_index"
                    )
                    snapshot_head.append(int(head))
                elif received >= 300 and len(snapshot_head) == 1:
                    snapshot_head.append(received)
                    redis.kill()
                    redis.restart()

            await follower.follow(stub, snapshot_then_crash)
            assert len(snapshot_head) == 2
            held = len(follower.events)
            assert held >= 300
            assert follower.rolled_back is not None, "the rewritten log was followed"
            diverged_at = int(follower.rolled_back["diverged_at"])
            assert diverged_at <= snapshot_head[0] < held  # where the restored log ends
            assert follower.rolled_back["incarnation"] == follower.incarnations[0]

            # The run carried on from the snapshot in a new incarnation; a reader that
            # starts again from diverged_at (or 0) reads the log as it now is.
            again = Follower(run_id)
            await again.follow(stub)
            assert again.rolled_back is None
            assert payloads(again.events)[-1] == "finish"
            run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
            assert run.incarnation != follower.incarnations[0]
    finally:
        await admin.aclose()
        _stop_redis(redis.process)


async def test_a_redis_restarted_empty_reports_runs_lost_not_hung_streams(
    start_keel: Any, disposable_redis: DisposableRedis
) -> None:
    keel = await start_on(start_keel, disposable_redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        run_id = await start_run(stub)
        follower = Follower(run_id)
        lost: list[grpc.aio.AioRpcError] = []

        async def wipe_at_50(received: int) -> None:
            if received >= 50 and not lost:
                disposable_redis.kill()
                disposable_redis.restart()  # without persistence: empty
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async with asyncio.timeout(FOLLOW_TIMEOUT_S):
                        while True:
                            try:
                                await stub.GetRun(pb.GetRunRequest(run_id=run_id))
                            except grpc.aio.AioRpcError as exc:
                                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                                    raise
                            await asyncio.sleep(0.05)
                lost.append(raised.value)
                raise asyncio.CancelledError  # stop following: the run is gone

        with pytest.raises(asyncio.CancelledError):
            await follower.follow(stub, wipe_at_50)
        assert lost[0].code() == grpc.StatusCode.NOT_FOUND
        # A client that resumes is told so, it does not wait for the run. (Like any client it
        # retries UNAVAILABLE: a pooled connection the restart closed answers so once.)
        request = pb.ObserveRequest(
            run_id=run_id, offset=len(follower.events), incarnation=follower.incarnation
        )
        async with asyncio.timeout(10):
            while True:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in stub.Observe(request):
                        pass
                if raised.value.code() != grpc.StatusCode.UNAVAILABLE:
                    break
                await asyncio.sleep(0.05)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_python_wrapper_raises_log_rolled_back_over_a_rolled_back_store(
    start_keel: Any, tmp_path: Path
) -> None:
    """The same scenario through keel_client: its handle resumes by itself across the
    restart, then raises LogRolledBack (it does not deliver the rewritten events)."""
    redis = persistent_redis(tmp_path, RDB_ONLY)
    admin = aioredis.from_url(redis.url)
    try:
        keel = await start_on(start_keel, redis)
        async with KeelClient(
            f"127.0.0.1:{keel.port}", initial_backoff_s=0.02, max_backoff_s=0.2
        ) as client:
            handle = client.stream("scripted", script(text(DELTAS, delay_ms=5)))
            received = 0
            with pytest.raises(LogRolledBack) as raised:
                async for event in handle.events():
                    assert event.index == received
                    received += 1
                    if received == 100:
                        await admin.execute_command("SAVE")
                    elif received == 300:
                        redis.kill()
                        redis.restart()
            assert received >= 300
            assert raised.value.diverged_at is not None and raised.value.diverged_at < received
            assert handle.next_offset == received  # nothing rewritten was handed out
    finally:
        await admin.aclose()
        _stop_redis(redis.process)
