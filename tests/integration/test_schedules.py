"""Schedules over gRPC on both backends: firing on every tick, pause, overlap policies,
THREADED memory, catch-up and daylight saving time under a fixed clock, triggers, the
schedule RPCs and their bad input."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel
from server.schedules.ticker import Ticker
from tests.integration.conftest import collect, field_violations, text_of
from tests.integration.test_streams import error_info

EVERY_SECOND = "* * * * * *"
NEW_YORK = ZoneInfo("America/New_York")
STARTED = pb.SCHEDULE_FIRING_OUTCOME_STARTED
SKIPPED = pb.SCHEDULE_FIRING_OUTCOME_SKIPPED
MISSED = pb.SCHEDULE_FIRING_OUTCOME_MISSED
TRIGGERED = pb.SCHEDULE_FIRING_OUTCOME_TRIGGERED


def steps(*items: dict[str, Any]) -> str:
    return json.dumps({"steps": list(items)})


def seconds(n: float) -> Duration:
    duration = Duration()
    duration.FromMilliseconds(round(n * 1000))
    return duration


def ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def local(tick: Any, zone: ZoneInfo = NEW_YORK) -> str:
    return datetime.fromtimestamp(tick.ToMilliseconds() / 1000, zone).isoformat()


@pytest.fixture
async def keel(start_keel: Callable[..., Any]) -> Keel:
    server: Keel = await start_keel(schedules_poll_interval_s=0.2)
    return server


@pytest.fixture
async def stub(keel: Keel) -> AsyncIterator[pb_grpc.AgentServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        yield pb_grpc.AgentServiceStub(channel)


async def create(stub: pb_grpc.AgentServiceStub, **fields: Any) -> pb.Schedule:
    fields.setdefault("agent_id", "scripted")
    fields.setdefault("cron", EVERY_SECOND)
    fields.setdefault("input", steps({"text": 1}))
    request = pb.CreateScheduleRequest(**fields)
    return (await stub.CreateSchedule(request)).schedule


async def firings(stub: pb_grpc.AgentServiceStub, schedule_id: str) -> list[pb.ScheduleFiring]:
    """Every kept firing, oldest first."""
    request = pb.ListScheduleRunsRequest(schedule_id=schedule_id, page_size=1000)
    return list(reversed((await stub.ListScheduleRuns(request)).firings))


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 30) -> Any:
    """Poll `check` until it returns something truthy; fail after timeout_s."""
    async with asyncio.timeout(timeout_s):
        while not (found := await check()):
            await asyncio.sleep(0.05)
    assert found, what
    return found


async def fired(
    stub: pb_grpc.AgentServiceStub, schedule_id: str, n: int, outcome: int = STARTED
) -> list[pb.ScheduleFiring]:
    async def enough() -> list[pb.ScheduleFiring] | None:
        found = [f for f in await firings(stub, schedule_id) if f.outcome == outcome]
        return found if len(found) >= n else None

    result: list[pb.ScheduleFiring] = await until(enough, f"{n} firings")
    return result


async def wait_ended(stub: pb_grpc.AgentServiceStub, run_ids: Sequence[str]) -> list[pb.Run]:
    async def ended() -> list[pb.Run] | None:
        runs = [(await stub.GetRun(pb.GetRunRequest(run_id=r))).run for r in run_ids]
        done = all(r.state >= pb.RUN_STATE_SUCCEEDED for r in runs)
        return runs if done else None

    result: list[pb.Run] = await until(ended, "the runs to end")
    return result


def tick_seconds(found: Sequence[pb.ScheduleFiring]) -> list[int]:
    return [f.tick_time.ToMilliseconds() // 1000 for f in found]


@pytest.mark.executors
async def test_a_seconds_cron_fires_on_every_tick(stub: pb_grpc.AgentServiceStub) -> None:
    schedule = await create(stub)
    assert schedule.thread_mode == pb.SCHEDULE_THREAD_MODE_THREADLESS
    assert schedule.overlap_policy == pb.SCHEDULE_OVERLAP_POLICY_SKIP
    assert schedule.timezone == "UTC"
    assert schedule.catch_up_window.ToSeconds() == 365 * 24 * 3600
    assert [t.ToMilliseconds() % 1000 for t in schedule.next_fire_times] == [0] * 5
    await fired(stub, schedule.schedule_id, 3)
    got = await firings(stub, schedule.schedule_id)
    # Every tick since the first is accounted for, once, in order (a tick that came
    # while this loaded machine was slow to fire it shows as MISSED, never twice; one
    # that came while the last firing's run was still going, which a loaded machine or
    # the Temporal executor can make last past the next second, as SKIPPED: the policy).
    ticks = tick_seconds(got)
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    assert {f.outcome for f in got} <= {STARTED, MISSED, SKIPPED}
    assert STARTED in {f.outcome for f in got}
    started = [f for f in got if f.outcome == STARTED]
    runs = await wait_ended(stub, [f.run_id for f in started])
    assert {r.schedule_id for r in runs} == {schedule.schedule_id}
    assert {r.state for r in runs} == {pb.RUN_STATE_SUCCEEDED}
    assert len({r.thread_id for r in runs}) == len(runs)  # THREADLESS: a fresh thread each
    assert all(f.fire_time.ToMilliseconds() >= f.tick_time.ToMilliseconds() for f in started)
    listed = (await stub.ListRuns(pb.ListRunsRequest(schedule_id=schedule.schedule_id))).runs
    assert {r.run_id for r in listed} >= {f.run_id for f in started}
    now = (await stub.GetSchedule(pb.GetScheduleRequest(schedule_id=schedule.schedule_id))).schedule
    assert now.last_run_id in {r.run_id for r in listed}
    assert len(now.recent_firings) <= 10 and now.recent_firings[0] == got[-1]


async def test_pause_stops_the_ticks_and_unpause_starts_them_again_from_now(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    schedule = await create(stub)
    await fired(stub, schedule.schedule_id, 1)
    paused = (
        await stub.UpdateSchedule(
            pb.UpdateScheduleRequest(
                schedule=pb.Schedule(schedule_id=schedule.schedule_id, paused=True),
                update_mask=FieldMask(paths=["paused"]),
            )
        )
    ).schedule
    assert paused.paused and list(paused.next_fire_times) == []
    before = len(await firings(stub, schedule.schedule_id))
    await asyncio.sleep(2.5)
    during = await firings(stub, schedule.schedule_id)
    assert len(during) <= before + 1  # at most a tick decided just before the pause
    resumed = (
        await stub.UpdateSchedule(
            pb.UpdateScheduleRequest(
                schedule=pb.Schedule(schedule_id=schedule.schedule_id, paused=False),
                update_mask=FieldMask(paths=["paused"]),
            )
        )
    ).schedule
    assert not resumed.paused and len(resumed.next_fire_times) == 5
    after = await fired(
        stub, schedule.schedule_id, len([f for f in during if f.outcome == STARTED]) + 1
    )
    # The ticks of the pause were neither fired nor recorded as missed.
    everything = await firings(stub, schedule.schedule_id)
    assert MISSED not in {f.outcome for f in everything}
    assert after[-1].tick_time.ToMilliseconds() > during[-1].tick_time.ToMilliseconds() + 2000


async def test_skip_records_the_ticks_that_come_while_the_last_run_is_active(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    # Each run takes about 2.5 s: most ticks find the previous one still going.
    schedule = await create(stub, input=steps({"text": 26, "delay_ms": 100}))
    skipped = await fired(stub, schedule.schedule_id, 2, SKIPPED)
    started = [f for f in await firings(stub, schedule.schedule_id) if f.outcome == STARTED]
    assert skipped[0].detail == started[0].run_id  # the run it found active
    await fired(stub, schedule.schedule_id, 2, STARTED)
    runs = (await stub.ListRuns(pb.ListRunsRequest(schedule_id=schedule.schedule_id))).runs
    active = [r for r in runs if r.state in (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)]
    assert len(active) <= 1  # never two at once


async def test_allow_starts_runs_beside_each_other(stub: pb_grpc.AgentServiceStub) -> None:
    schedule = await create(
        stub,
        input=steps({"text": 40, "delay_ms": 100}),
        overlap_policy=pb.SCHEDULE_OVERLAP_POLICY_ALLOW,
    )
    started = await fired(stub, schedule.schedule_id, 2)

    async def overlapping() -> bool:
        runs = [(await stub.GetRun(pb.GetRunRequest(run_id=f.run_id))).run for f in started]
        return all(r.state == pb.RUN_STATE_RUNNING for r in runs)

    await until(overlapping, "two runs at once")
    for f in started:
        await stub.CancelRun(pb.CancelRunRequest(run_id=f.run_id))


@pytest.mark.executors
async def test_threaded_firings_share_one_thread_whose_history_grows(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    schedule = await create(
        stub,
        input=steps({"echo_history": True}, {"text": 1}),
        thread_mode=pb.SCHEDULE_THREAD_MODE_THREADED,
    )
    assert schedule.thread_id
    started = await fired(stub, schedule.schedule_id, 3)
    runs = await wait_ended(stub, [f.run_id for f in started])
    assert {r.thread_id for r in runs} == {schedule.thread_id}
    said = []
    for run in runs:
        events = (await collect(stub.Observe(pb.ObserveRequest(run_id=run.run_id)))).events
        said.append(text_of(events).split(" ")[0])
    assert said == [f"history={n}" for n in range(len(runs))]  # each saw the ones before
    thread = (await stub.GetThread(pb.GetThreadRequest(thread_id=schedule.thread_id))).thread
    assert thread.message_count >= 2 * len(runs)


@pytest.mark.executors
async def test_enqueue_queues_firings_on_the_schedules_thread(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    # Runs of 1.5 s, a tick every second: each firing waits for the one before it.
    schedule = await create(
        stub,
        input=steps({"text": 16, "delay_ms": 100}),
        thread_mode=pb.SCHEDULE_THREAD_MODE_THREADED,
        overlap_policy=pb.SCHEDULE_OVERLAP_POLICY_ENQUEUE,
    )

    async def queued() -> bool:
        thread = (await stub.GetThread(pb.GetThreadRequest(thread_id=schedule.thread_id))).thread
        return len(thread.queued_run_ids) >= 1

    await until(queued, "a firing waiting in the thread's queue")
    await stub.UpdateSchedule(
        pb.UpdateScheduleRequest(
            schedule=pb.Schedule(schedule_id=schedule.schedule_id, paused=True),
            update_mask=FieldMask(paths=["paused"]),
        )
    )
    got = await firings(stub, schedule.schedule_id)
    assert SKIPPED not in {f.outcome for f in got}
    runs = await wait_ended(stub, [f.run_id for f in got if f.outcome == STARTED])
    assert {r.state for r in runs} == {pb.RUN_STATE_SUCCEEDED}
    # One at a time, in the order they fired.
    spans = []
    for run in runs:
        events = (await collect(stub.Observe(pb.ObserveRequest(run_id=run.run_id)))).events
        spans.append((events[0].time.ToNanoseconds(), events[-1].time.ToNanoseconds()))
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


async def test_skip_on_a_threaded_schedule_skips_while_its_thread_is_busy(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    thread = (await stub.CreateThread(pb.CreateThreadRequest())).thread
    # A run of the caller's holds the thread.
    busy = await stub.StartRun(
        pb.StartRunRequest(
            agent_id="scripted",
            input=steps({"text": 30, "delay_ms": 100}),
            thread_id=thread.thread_id,
        )
    )
    schedule = await create(
        stub, thread_mode=pb.SCHEDULE_THREAD_MODE_THREADED, thread_id=thread.thread_id
    )
    assert schedule.thread_id == thread.thread_id
    skipped = await fired(stub, schedule.schedule_id, 1, SKIPPED)
    assert skipped[0].detail == busy.run.run_id
    await stub.CancelRun(pb.CancelRunRequest(run_id=busy.run.run_id))
    started = await fired(stub, schedule.schedule_id, 1)
    run = (await stub.GetRun(pb.GetRunRequest(run_id=started[0].run_id))).run
    assert run.thread_id == thread.thread_id


async def test_catch_up_fires_the_latest_tick_in_the_window_and_records_the_rest(
    keel: Keel, stub: pb_grpc.AgentServiceStub
) -> None:
    # A yearly schedule, fired by a ticker whose clock jumps years ahead: the
    # service was down through several ticks.
    schedule = await create(
        stub, cron="0 0 1 1 *", catch_up_window=seconds(3600), input=steps({"text": 1})
    )
    first = schedule.next_fire_times[0].ToMilliseconds()
    year = datetime.fromtimestamp(first / 1000, UTC).year
    clock = [ms(datetime(year + 3, 1, 1, 0, 30, tzinfo=UTC))]  # 30 min after a tick
    ticker = Ticker(keel.ticker.store, keel.log, keel.executor, clock=lambda: clock[0])
    assert await ticker.tick_once() == 1
    got = await firings(stub, schedule.schedule_id)
    assert [(f.outcome, f.tick_time.ToDatetime().year) for f in got] == [
        (MISSED, year),
        (MISSED, year + 1),
        (MISSED, year + 2),
        (STARTED, year + 3),  # one firing: never a burst
    ]
    await wait_ended(stub, [got[-1].run_id])
    # Down again, past the window: the latest tick is too old to fire.
    clock[0] = ms(datetime(year + 4, 1, 1, 2, tzinfo=UTC))  # 2 h after a tick
    assert await ticker.tick_once() == 1
    got = await firings(stub, schedule.schedule_id)
    assert [(f.outcome, f.tick_time.ToDatetime().year) for f in got[4:]] == [(MISSED, year + 4)]
    now = (await stub.GetSchedule(pb.GetScheduleRequest(schedule_id=schedule.schedule_id))).schedule
    assert now.next_fire_times[0].ToDatetime().year == year + 5
    assert now.last_run_id == got[3].run_id


async def test_daylight_saving_time_follows_the_library_under_a_fixed_clock(
    keel: Keel, stub: pb_grpc.AgentServiceStub
) -> None:
    schedule = await create(
        stub,
        cron="30 2 * * *",
        timezone="America/New_York",
        overlap_policy=pb.SCHEDULE_OVERLAP_POLICY_ALLOW,
    )
    clock = [ms(datetime(2027, 3, 13, 2, 31, tzinfo=NEW_YORK))]
    ticker = Ticker(keel.ticker.store, keel.log, keel.executor, clock=lambda: clock[0])
    await ticker.tick_once()  # catches up to 2027-03-13 02:30 EST
    got = await stub.GetSchedule(pb.GetScheduleRequest(schedule_id=schedule.schedule_id))
    assert [local(t) for t in got.schedule.next_fire_times[:3]] == [
        "2027-03-14T03:00:00-04:00",  # 02:30 does not exist that day: right after the gap
        "2027-03-15T02:30:00-04:00",
        "2027-03-16T02:30:00-04:00",
    ]
    clock[0] = ms(datetime(2027, 3, 14, 3, 0, 30, tzinfo=NEW_YORK))
    assert await ticker.tick_once() == 1
    last = (await firings(stub, schedule.schedule_id))[-1]
    assert (last.outcome, local(last.tick_time)) == (STARTED, "2027-03-14T03:00:00-04:00")


async def test_trigger_fires_now_even_when_paused_and_once_per_request_id(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    goal = pb.Goal(objective="say DONE", judge_agent_id="scripted-judge", max_attempts=2)
    schedule = await create(
        stub, paused=True, input=json.dumps({"steps": [{"text": 1}], "satisfy_on": 2}), goal=goal
    )
    request = pb.TriggerScheduleRequest(schedule_id=schedule.schedule_id, request_id="t-1")
    first = await stub.TriggerSchedule(request)
    again = await stub.TriggerSchedule(request)
    assert first.run.run_id == again.run.run_id
    assert again.firing == first.firing  # the firing recorded the first time
    assert first.firing.outcome == TRIGGERED and first.firing.run_id == first.run.run_id
    assert first.run.schedule_id == schedule.schedule_id and first.run.goal == goal
    other = await stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id=schedule.schedule_id))
    assert other.run.run_id != first.run.run_id
    got = await firings(stub, schedule.schedule_id)
    assert [(f.outcome, f.run_id) for f in got] == [
        (TRIGGERED, first.run.run_id),
        (TRIGGERED, other.run.run_id),
    ]
    [run, _] = await wait_ended(stub, [first.run.run_id, other.run.run_id])
    assert run.goal_met and run.goal_attempts == 2
    now = (await stub.GetSchedule(pb.GetScheduleRequest(schedule_id=schedule.schedule_id))).schedule
    assert now.paused and now.last_run_id == other.run.run_id


async def test_create_is_idempotent_by_request_id_and_ids_are_unique(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    made = await create(stub, request_id="r-1", paused=True)
    assert made.request_id == "r-1"
    assert (await create(stub, request_id="r-1", paused=True)) == made
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await create(stub, request_id="r-1", paused=True, input=steps({"text": 2}))
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(reused.value).reason == "REQUEST_ID_REUSED"
    named = await create(stub, schedule_id="digest", paused=True)
    assert named.schedule_id == "digest"
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await create(stub, schedule_id="digest", paused=True)
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(taken.value).reason == "SCHEDULE_ALREADY_EXISTS"


async def test_list_update_delete_and_paging(stub: pb_grpc.AgentServiceStub) -> None:
    made = [await create(stub, schedule_id=f"s{n}", paused=True) for n in range(3)]
    page = await stub.ListSchedules(pb.ListSchedulesRequest(page_size=2))
    rest = await stub.ListSchedules(
        pb.ListSchedulesRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [s.schedule_id for s in [*page.schedules, *rest.schedules]] == ["s2", "s1", "s0"]
    assert not rest.next_page_token
    assert (await stub.ListSchedules(pb.ListSchedulesRequest(agent_id="other"))).schedules == []
    changed = (
        await stub.UpdateSchedule(
            pb.UpdateScheduleRequest(
                schedule=pb.Schedule(
                    schedule_id="s1",
                    cron="0 6 * * *",
                    timezone="America/New_York",
                    input=steps({"text": 3}),
                    paused=False,
                ),
                update_mask=FieldMask(paths=["cron", "timezone", "input", "paused"]),
            )
        )
    ).schedule
    assert (changed.cron, changed.timezone, changed.paused) == (
        "0 6 * * *",
        "America/New_York",
        False,
    )
    assert [local(t)[11:] for t in changed.next_fire_times] == ["06:00:00-05:00"] * 5
    assert changed.update_time.ToMilliseconds() >= made[1].update_time.ToMilliseconds()
    await stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id="s1"))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetSchedule(pb.GetScheduleRequest(schedule_id="s1"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    left = (await stub.ListSchedules(pb.ListSchedulesRequest())).schedules
    assert [s.schedule_id for s in left] == ["s2", "s0"]


async def test_a_deleted_schedule_fires_no_more(stub: pb_grpc.AgentServiceStub) -> None:
    schedule = await create(stub)
    await fired(stub, schedule.schedule_id, 1)
    await stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id=schedule.schedule_id))
    await asyncio.sleep(0.3)  # a tick decided before the delete may still start its run
    runs = (await stub.ListRuns(pb.ListRunsRequest(schedule_id=schedule.schedule_id))).runs
    await asyncio.sleep(2.2)
    later = (await stub.ListRuns(pb.ListRunsRequest(schedule_id=schedule.schedule_id))).runs
    assert len(later) == len(runs)


async def test_list_schedule_runs_pages_newest_first(stub: pb_grpc.AgentServiceStub) -> None:
    schedule = await create(stub, paused=True)
    triggered = [
        (await stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id=schedule.schedule_id)))
        for _ in range(3)
    ]
    page = await stub.ListScheduleRuns(
        pb.ListScheduleRunsRequest(schedule_id=schedule.schedule_id, page_size=2)
    )
    rest = await stub.ListScheduleRuns(
        pb.ListScheduleRunsRequest(
            schedule_id=schedule.schedule_id, page_size=2, page_token=page.next_page_token
        )
    )
    seen = [f.run_id for f in [*page.firings, *rest.firings]]
    assert seen == [t.run.run_id for t in reversed(triggered)] and not rest.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stub.ListScheduleRuns(
            pb.ListScheduleRunsRequest(schedule_id="elsewhere", page_token=page.next_page_token)
        )
    assert other.value.code() == grpc.StatusCode.INVALID_ARGUMENT


BAD_CREATES: list[tuple[dict[str, Any], str, str]] = [
    ({"cron": "61 * * * *"}, "cron", "not a valid cron expression"),
    ({"cron": ""}, "cron", "is required"),
    ({"cron": "* * *"}, "cron", "has 3 fields"),
    ({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
    ({"catch_up_window": seconds(0.5)}, "catch_up_window", "from 1 second to 366 days"),
    ({"catch_up_window": seconds(400 * 86400)}, "catch_up_window", "from 1 second"),
    ({"catch_up_window": seconds(-5)}, "catch_up_window", "from 1 second"),
    ({"agent_id": "nobody"}, "agent_id", "unknown agent"),
    ({"agent_id": ""}, "agent_id", "is required"),
    ({"input": "not a script"}, "input", "invalid script"),
    ({"overlap_policy": pb.SCHEDULE_OVERLAP_POLICY_ENQUEUE}, "overlap_policy", "THREADED"),
    (
        {
            "overlap_policy": pb.SCHEDULE_OVERLAP_POLICY_ALLOW,
            "thread_mode": pb.SCHEDULE_THREAD_MODE_THREADED,
        },
        "overlap_policy",
        "THREADLESS",
    ),
    ({"thread_id": "t1"}, "thread_id", "only for a THREADED"),
    ({"thread_mode": 7}, "thread_mode", "not a valid value"),
    ({"schedule_id": "{bad}"}, "schedule_id", "letters, digits"),
    ({"request_id": "x" * 200}, "request_id", "characters long"),
    (
        {"goal": pb.Goal(objective="x", judge_agent_id="nobody")},
        "goal.judge_agent_id",
        "unknown agent",
    ),
    (
        {"goal": pb.Goal(objective="x", judge_agent_id="scripted-judge", max_attempts=500)},
        "goal.max_attempts",
        "from 1 to 100",
    ),
]


@pytest.mark.parametrize(("fields", "field", "says"), BAD_CREATES)
async def test_bad_creates_are_invalid_arguments_and_create_nothing(
    stub: pb_grpc.AgentServiceStub, fields: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    violations = field_violations(caught.value)
    assert any(f == field and says in d for f, d in violations), violations
    assert (await stub.ListSchedules(pb.ListSchedulesRequest())).schedules == []


async def test_a_threaded_schedule_on_an_unknown_thread_is_not_found(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, thread_mode=pb.SCHEDULE_THREAD_MODE_THREADED, thread_id="nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await stub.ListSchedules(pb.ListSchedulesRequest())).schedules == []


async def test_unknown_schedules_are_not_found(stub: pb_grpc.AgentServiceStub) -> None:
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: stub.GetSchedule(pb.GetScheduleRequest(schedule_id="nope")),
        lambda: stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id="nope")),
        lambda: stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id="nope")),
        lambda: stub.ListScheduleRuns(pb.ListScheduleRunsRequest(schedule_id="nope")),
        lambda: stub.UpdateSchedule(
            pb.UpdateScheduleRequest(
                schedule=pb.Schedule(schedule_id="nope", paused=True),
                update_mask=FieldMask(paths=["paused"]),
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "SCHEDULE_NOT_FOUND"


@pytest.mark.parametrize(
    ("schedule", "paths", "field", "says"),
    [
        (pb.Schedule(schedule_id="s"), [], "update_mask", "names no field"),
        (pb.Schedule(schedule_id="s"), ["thread_mode"], "update_mask", "cannot be updated"),
        (pb.Schedule(schedule_id="s", cron="nope"), ["cron"], "cron", "has 1 fields"),
        (pb.Schedule(schedule_id="s"), ["agent_id"], "schedule.agent_id", "is required"),
        (
            pb.Schedule(schedule_id="s", overlap_policy=pb.SCHEDULE_OVERLAP_POLICY_ENQUEUE),
            ["overlap_policy"],
            "overlap_policy",
            "THREADED",
        ),
        (
            pb.Schedule(schedule_id="s", catch_up_window=seconds(0)),
            ["catch_up_window"],
            "schedule.catch_up_window",
            "from 1 second",
        ),
        (pb.Schedule(), ["paused"], "schedule.schedule_id", "is required"),
    ],
)
async def test_bad_updates_are_invalid_arguments_and_change_nothing(
    stub: pb_grpc.AgentServiceStub,
    schedule: pb.Schedule,
    paths: list[str],
    field: str,
    says: str,
) -> None:
    before = await create(stub, schedule_id="s", paused=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateSchedule(
            pb.UpdateScheduleRequest(schedule=schedule, update_mask=FieldMask(paths=paths))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    violations = field_violations(caught.value)
    assert any(f == field and says in d for f, d in violations), violations
    after = (await stub.GetSchedule(pb.GetScheduleRequest(schedule_id="s"))).schedule
    assert after == before
