"""Failover to a Redis replica, with real redis-servers: a primary and its replica.

Replication is asynchronous: a replica promoted (REPLICAOF NO ONE) may lag
its primary. The promoted replica is another redis-server process, so
another incarnation: a client that holds events the replica never got is
told LOG_ROLLED_BACK, never handed the run's new events under those
indices. With --redis-wait-replicas every append waits until the replica
acknowledged it, so a writer never runs ahead of its replica: an append the
replica does not acknowledge fails, and the run waits instead of going on.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel
from server.events.keys import Keys
from tests.conftest import _start_redis, _stop_redis
from tests.integration.conftest import payloads, script, text
from tests.integration.test_store_restarts import Follower

REPLICA_TIMEOUT_S = 30.0


@pytest.fixture
def backend() -> str:
    return "redis"


class Pair:
    """A primary and a replica of it, each a redis-server of the test's own."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "primary").mkdir()
        (tmp_path / "replica").mkdir()
        self.primary, self.primary_url = _start_redis(tmp_path / "primary")
        port = self.primary_url.rsplit(":", 1)[1].split("/")[0]
        self.replica, self.replica_url = _start_redis(
            tmp_path / "replica", persistence=("--replicaof", "127.0.0.1", port)
        )

    async def replicating(self) -> None:
        replica = aioredis.from_url(self.replica_url)
        try:
            async with asyncio.timeout(REPLICA_TIMEOUT_S):
                while (await replica.info("replication")).get("master_link_status") != "up":
                    await asyncio.sleep(0.05)
        finally:
            await replica.aclose()

    async def promote(self) -> None:
        replica = aioredis.from_url(self.replica_url)
        try:
            await replica.execute_command("REPLICAOF", "NO", "ONE")
        finally:
            await replica.aclose()

    def stop(self) -> None:
        for process in (self.primary, self.replica):
            _stop_redis(process)


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    both = Pair(tmp_path)
    try:
        await both.replicating()
        yield both
    finally:
        both.stop()


async def start_on(start_keel: Any, url: str, **settings: Any) -> Keel:
    keel: Keel = await start_keel(
        redis_url=url,
        lease_ttl_s=1.0,
        sweep_interval_s=0.1,
        heartbeat_interval_s=0.1,
        health_check_interval_s=0.1,
        **settings,
    )
    return keel


async def test_a_client_ahead_of_a_promoted_lagging_replica_is_told_not_misled(
    start_keel: Any, pair: Pair
) -> None:
    """The replica is promoted at about event 100 (it follows the primary no more), the
    client gets 200 more from the primary, then the primary dies and the servers move to
    the replica: the run goes on from the replica's state, and the client is told that
    the log went back."""
    keel = await start_on(start_keel, pair.primary_url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        started = await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(600, delay_ms=5)))
        )
        run_id = started.run.run_id
        follower = Follower(run_id)
        promoted: list[int] = []

        async def promote_then_stop(received: int) -> None:
            if received >= 100 and not promoted:
                await pair.promote()
                promoted.append(received)
            elif received >= 300:
                raise asyncio.CancelledError  # the client drops here, holding 300+ events

        with pytest.raises(asyncio.CancelledError):
            await follower.follow(stub, promote_then_stop)
    pair.primary.kill()  # the primary dies; the operator points the servers at the replica
    pair.primary.wait()
    await keel.stop(grace_s=0)

    survivor = await start_on(start_keel, pair.replica_url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{survivor.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        held = len(follower.events)
        await follower.follow(stub)
        assert follower.rolled_back is not None, "the lagging replica's log was followed"
        assert int(follower.rolled_back["diverged_at"]) < held
        # The run itself carries on from what the replica has, in its incarnation.
        again = Follower(run_id)
        await again.follow(stub)
        assert again.rolled_back is None
        assert payloads(again.events)[-1] == "finish"
        run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
        assert run.incarnation != follower.rolled_back["incarnation"]


async def test_with_wait_every_append_reaches_the_replica_before_the_run_goes_on(
    start_keel: Any, pair: Pair
) -> None:
    keel = await start_on(start_keel, pair.primary_url, redis_wait_replicas=1)
    primary = aioredis.from_url(pair.primary_url)
    replica = aioredis.from_url(pair.replica_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            started = await stub.StartRun(
                pb.StartRunRequest(agent_id="scripted", input=script(text(300, delay_ms=2)))
            )
            run_id = started.run.run_id
            follower = Follower(run_id)
            await follower.follow(stub)
            assert payloads(follower.events)[-1] == "finish"
            waits = (await primary.info("commandstats")).get("cmdstat_wait", {})
            assert int(waits.get("calls", 0)) > 0  # appends waited for the replica
            events_key = Keys(keel.settings.key_prefix).events(run_id)
            assert await replica.zcard(events_key) == len(follower.events)

            # The replica leaves: nothing acknowledges appends any more, so a new run does
            # not get ahead of what the replica holds by more than one batch in flight.
            await pair.promote()
            started = await stub.StartRun(
                pb.StartRunRequest(agent_id="scripted", input=script(text(300, delay_ms=2)))
            )
            stalled = started.run.run_id
            await asyncio.sleep(3)  # long enough for the run to finish, were it not held
            record = (await stub.GetRun(pb.GetRunRequest(run_id=stalled))).run
            assert record.state != pb.RUN_STATE_SUCCEEDED
            on_primary = await primary.zcard(Keys(keel.settings.key_prefix).events(stalled))
            assert on_primary < 300
    finally:
        await primary.aclose()
        await replica.aclose()


def test_waiting_for_replicas_is_refused_on_a_cluster(tmp_path: Path) -> None:
    """A cluster's nodes each have replicas of their own: one WAIT cannot speak for them."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--redis-url",
            "redis+cluster://127.0.0.1:1",
            "--redis-wait-replicas",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode != 0
    assert "needs a single Redis" in result.stderr
