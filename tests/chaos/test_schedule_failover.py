"""Schedules across Keel processes on one Redis: three servers fire every tick exactly
once, and the ticks go on firing when one of them is SIGKILLed."""

from __future__ import annotations

from collections import Counter

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.events.log import EventLog
from server.schedules.factory import schedule_store_for
from server.schedules.records import Outcome
from tests.chaos.conftest import Cluster, script, wait_for

TICKS = 22


async def test_three_servers_fire_each_tick_once_and_survive_a_sigkill(
    cluster: Cluster, store: EventLog
) -> None:
    servers = [
        await cluster.start(KEEL_INSTANCE_ID=name, KEEL_SCHEDULES_POLL_INTERVAL_S="0.2")
        for name in ("first", "second", "third")
    ]
    async with grpc.aio.insecure_channel(servers[0].target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        created = await stub.CreateSchedule(
            pb.CreateScheduleRequest(
                agent_id="scripted",
                cron="* * * * * *",
                input=script({"text": 1}),
                overlap_policy=pb.SCHEDULE_OVERLAP_POLICY_ALLOW,
            )
        )
    schedule_id = created.schedule.schedule_id
    schedules = schedule_store_for(store)

    async def recorded(n: int) -> bool:
        return len(await schedules.firings(schedule_id, limit=1000)) >= n

    await wait_for(lambda: recorded(TICKS // 3), timeout_s=60, what="a third of the ticks")
    doomed = servers[1]
    doomed.kill()
    await doomed.wait()
    await wait_for(lambda: recorded(TICKS), timeout_s=60, what=f"{TICKS} ticks")
    # Pause it, then let what was decided be carried out.
    async with grpc.aio.insecure_channel(servers[0].target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        await stub.UpdateSchedule(
            pb.UpdateScheduleRequest(
                schedule=pb.Schedule(schedule_id=schedule_id, paused=True),
                update_mask={"paths": ["paused"]},
            )
        )

    async def settled() -> bool:
        return (await schedules.get(schedule_id)).pending is None

    await wait_for(settled, timeout_s=30, what="the last decided tick to be carried out")
    firings = list(reversed(await schedules.firings(schedule_id, limit=1000)))
    ticks = [f.tick_ms for f in firings]
    # Every tick from the first on, each exactly once, in order: none twice, none lost
    # (a tick the servers were too busy to fire in time is recorded MISSED, not dropped).
    assert Counter(ticks).most_common(1)[0][1] == 1
    assert ticks == sorted(ticks)
    assert [t - ticks[0] for t in ticks] == [1000 * n for n in range(len(ticks))]
    started = [f for f in firings if f.outcome is Outcome.STARTED]
    assert len(started) >= TICKS - 3
    assert {f.outcome for f in firings} <= {Outcome.STARTED, Outcome.MISSED}
    # One run per started tick: no tick started a second run.
    runs = await store.list_runs(schedule_id=schedule_id, limit=1000)
    assert sorted(r.run_id for r in runs) == sorted(f.run_id for f in started)
    # Every run ends (the dead server's are taken over), and the last ticks were fired
    # by the servers still alive.

    async def all_ended() -> bool:
        states = [(await store.get_run(f.run_id)).state for f in started]
        return all(state.terminal for state in states)

    await wait_for(all_ended, timeout_s=60, what="every run to end")
    owners = Counter([(await store.get_run(f.run_id)).owner for f in started[-5:]])
    assert set(owners) <= {"first", "third"}
