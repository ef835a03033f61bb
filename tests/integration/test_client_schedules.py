"""keel_client's schedules and goals against a real Keel server, both backends.

A schedule starts a run of an agent on each tick of a cron expression (six
fields: a leading seconds field, so "* * * * * *" fires every second); a
goal makes a run go on, attempt after attempt, until the judge agent
`scripted-judge` is satisfied: the scripted agent's `"satisfy_on": K` makes
its K-th attempt say "DONE", which the judge accepts. Waits for the server
(a tick firing, a run ending) poll with generous bounds, never sleep a fixed
time. The blocking client's helpers run in a thread of their own
(`blocking`, as in test_client_sync.py) while the test's loop serves.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel_client import KeelClient
from keel_client import sync as blocking_client

from server.agents.testing import SATISFIED
from server.app import Keel
from tests.integration.conftest import (
    assert_contiguous,
    field_violations,
    payloads,
    script,
    text,
    text_of,
)
from tests.integration.test_client_sync import blocking
from tests.integration.test_client_tasks import assert_code, eventually, eventually_sync

FAST: dict[str, Any] = {"initial_backoff_s": 0.02, "max_backoff_s": 0.5, "max_reconnects": 20}
EVERY_SECOND = "* * * * * *"
WEEKDAYS_AT_9 = "0 9 * * 1-5"
PARIS = "Europe/Paris"
TWO = script(text(2))  # a run that says "t0 t1 done"
JUDGE = "scripted-judge"
FIRE_WAIT_S = 30.0  # a "* * * * * *" schedule fires within about a second; a loaded machine is slow
DEFAULT_WINDOW_S = 365 * 24 * 3600
UNKNOWN = "no-such-schedule"
STARTED, TRIGGERED = pb.SCHEDULE_FIRING_OUTCOME_STARTED, pb.SCHEDULE_FIRING_OUTCOME_TRIGGERED


def goal(max_attempts: int = 3) -> pb.Goal:
    return pb.Goal(objective="x", judge_agent_id=JUDGE, max_attempts=max_attempts)


def goal_script(satisfy_on: int) -> str:
    """One line of text per attempt; attempt `satisfy_on` says DONE."""
    return json.dumps({"steps": [text(1)], "satisfy_on": satisfy_on})


def evaluations(events: Sequence[pb.AgentEvent]) -> list[tuple[int, bool, int]]:
    """(attempt, satisfied, max_attempts) of each goal_evaluated event."""
    return [
        (e.goal_evaluated.attempt, e.goal_evaluated.satisfied, e.goal_evaluated.max_attempts)
        for e in events
        if e.WhichOneof("payload") == "goal_evaluated"
    ]


def assert_goal_met_on_attempt_2(events: Sequence[pb.AgentEvent]) -> None:
    """The events of a goal_script(2) run with goal(3): judged twice, met the second time."""
    assert_contiguous(events)
    assert evaluations(events) == [(1, False, 3), (2, True, 3)]
    assert payloads(events)[-2:] == ["goal_evaluated", "finish"]
    finish = events[-1].finish
    assert finish.HasField("goal_met") and finish.goal_met
    assert finish.output_text == f"done {SATISFIED}"
    judged = [e.goal_evaluated for e in events if e.WhichOneof("payload") == "goal_evaluated"]
    assert judged[0].reason and judged[1].score == pytest.approx(1.0)


def assert_goal_run(run: pb.Run) -> None:
    assert run.state == pb.RUN_STATE_SUCCEEDED, run
    assert run.goal == goal()
    assert (run.HasField("goal_met"), run.goal_met, run.goal_attempts) == (True, True, 2)


def paris_times(schedule: pb.Schedule) -> list[datetime]:
    return [
        datetime.fromtimestamp(t.ToNanoseconds() / 1e9, tz=UTC).astimezone(ZoneInfo(PARIS))
        for t in schedule.next_fire_times
    ]


def outcomes(firings: Sequence[pb.ScheduleFiring]) -> list[str]:
    return [
        pb.ScheduleFiringOutcome.Name(f.outcome).removeprefix("SCHEDULE_FIRING_OUTCOME_")
        for f in firings
    ]


async def ended(client: KeelClient, run_id: str) -> pb.Run:
    """The run, once it ended (read to its terminal event)."""
    events = [event async for event in client.run(run_id).events()]
    assert_contiguous(events)
    assert payloads(events)[0] == "start" and payloads(events)[-1] == "finish", payloads(events)
    return await client.get_run(run_id)


# The asyncio client.


async def test_create_get_list_update_and_delete_a_schedule(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        created = await client.create_schedule(
            "scripted",
            WEEKDAYS_AT_9,
            TWO,
            timezone=PARIS,
            schedule_id="reports",
            catch_up_window=90.0,
            paused=True,
            goal=goal(),
        )
        assert created.schedule_id == "reports" and created.agent_id == "scripted"
        assert (created.cron, created.timezone, created.input) == (WEEKDAYS_AT_9, PARIS, TWO)
        # UNSPECIFIED means THREADLESS and SKIP; the server says which.
        assert created.thread_mode == pb.SCHEDULE_THREAD_MODE_THREADLESS
        assert created.overlap_policy == pb.SCHEDULE_OVERLAP_POLICY_SKIP
        assert created.catch_up_window.ToMilliseconds() == 90_000
        assert created.paused and list(created.next_fire_times) == []
        assert created.goal == goal() and created.thread_id == "" and created.last_run_id == ""
        assert created.create_time.ToNanoseconds() > 0

        got = await client.get_schedule("reports")
        assert got == created and list(got.recent_firings) == []

        # Resumed: the next fire times are weekdays at 09:00 in Paris.
        resumed = await client.resume_schedule("reports")
        assert not resumed.paused
        fires = paris_times(resumed)
        assert len(fires) == 5 and fires == sorted(fires)
        assert all((t.hour, t.minute, t.second) == (9, 0, 0) for t in fires), fires
        assert all(t.isoweekday() <= 5 for t in fires), fires
        assert fires[0] > datetime.now(tz=UTC)

        # Only the fields given change: the mask names cron and input, nothing else.
        changed = await client.update_schedule("reports", cron="30 7 * * *", input=script(text(1)))
        assert (changed.cron, changed.input) == ("30 7 * * *", script(text(1)))
        assert changed.timezone == PARIS and changed.catch_up_window.ToMilliseconds() == 90_000
        assert changed.goal == goal() and not changed.paused
        assert [(t.hour, t.minute) for t in paris_times(changed)] == [(7, 30)] * 5
        assert changed.update_time.ToNanoseconds() >= resumed.update_time.ToNanoseconds()
        assert changed.create_time == created.create_time

        # None given: the goal is cleared, the catch-up window is the default again.
        cleared = await client.update_schedule("reports", goal=None, catch_up_window=None)
        assert not cleared.HasField("goal")
        assert cleared.catch_up_window.seconds == DEFAULT_WINDOW_S
        assert (cleared.cron, cleared.timezone) == ("30 7 * * *", PARIS)
        retimed = await client.update_schedule(
            "reports",
            timezone="UTC",
            overlap_policy=pb.SCHEDULE_OVERLAP_POLICY_ALLOW,
            catch_up_window=2.5,
            goal=goal(),
        )
        assert retimed.timezone == "UTC" and retimed.goal == goal()
        assert retimed.overlap_policy == pb.SCHEDULE_OVERLAP_POLICY_ALLOW
        assert retimed.catch_up_window.ToMilliseconds() == 2_500

        paused = await client.pause_schedule("reports")
        assert paused.paused and list(paused.next_fire_times) == []
        assert (paused.cron, paused.input) == ("30 7 * * *", script(text(1)))

        # Listed by agent, newest first, page by page.
        await client.create_schedule("scripted", "@daily", TWO, schedule_id="second", paused=True)
        await client.create_schedule("scripted", "@hourly", TWO, schedule_id="third", paused=True)
        first = await client.list_schedules(agent_id="scripted", page_size=2)
        assert [s.schedule_id for s in first.schedules] == ["third", "second"]
        assert first.next_page_token
        rest = await client.list_schedules(
            agent_id="scripted", page_size=2, page_token=first.next_page_token
        )
        assert [s.schedule_id for s in rest.schedules] == ["reports"]
        assert rest.next_page_token == ""
        assert rest.schedules[0].cron == "30 7 * * *" and rest.schedules[0].paused
        assert list((await client.list_schedules(agent_id=JUDGE)).schedules) == []

        await client.delete_schedule("reports")
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await client.get_schedule("reports")
        assert_code(gone.value, grpc.StatusCode.NOT_FOUND, "SCHEDULE_NOT_FOUND")
        listed = await client.list_schedules()
        assert [s.schedule_id for s in listed.schedules] == ["third", "second"]


async def test_trigger_a_paused_schedule_and_list_its_firings_and_runs(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        schedule = await client.create_schedule("scripted", "@yearly", TWO, paused=True)
        schedule_id = schedule.schedule_id
        assert schedule_id

        fired = await client.trigger_schedule(schedule_id, request_id="first")
        assert fired.firing.outcome == TRIGGERED and fired.firing.run_id == fired.run.run_id
        assert fired.run.schedule_id == schedule_id and fired.run.input == TWO
        assert fired.run.thread_id  # THREADLESS: a fresh thread of its own
        # The same request_id again: the same run, one firing.
        again = await client.trigger_schedule(schedule_id, request_id="first")
        assert again.run.run_id == fired.run.run_id
        run = await ended(client, fired.run.run_id)
        assert run.schedule_id == schedule_id and run.agent_id == "scripted"

        others = [(await client.trigger_schedule(schedule_id)).run.run_id for _ in range(2)]
        for run_id in others:
            await ended(client, run_id)
        run_ids = [fired.run.run_id, *others]
        assert len(set(run_ids)) == 3

        # The firings, newest first, page by page.
        first = await client.list_schedule_runs(schedule_id, page_size=2)
        assert outcomes(first.firings) == ["TRIGGERED", "TRIGGERED"] and first.next_page_token
        rest = await client.list_schedule_runs(
            schedule_id, page_size=2, page_token=first.next_page_token
        )
        assert outcomes(rest.firings) == ["TRIGGERED"] and rest.next_page_token == ""
        assert [f.run_id for f in [*first.firings, *rest.firings]] == run_ids[::-1]

        got = await client.get_schedule(schedule_id)
        assert got.paused and got.last_run_id == others[-1]
        assert [f.run_id for f in got.recent_firings] == run_ids[::-1]

        # The schedule's runs, and only them.
        await client.start_run("scripted", TWO)
        runs = await client.list_runs(schedule_id=schedule_id)
        assert [r.run_id for r in runs.runs] == run_ids[::-1]
        assert {r.schedule_id for r in runs.runs} == {schedule_id}

        # Deleted: its runs stay.
        await client.delete_schedule(schedule_id)
        assert (await client.get_run(others[0])).state == pb.RUN_STATE_SUCCEEDED


async def test_a_schedule_every_second_fires_by_itself(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        schedule = await client.create_schedule("scripted", EVERY_SECOND, TWO)
        assert not schedule.paused and len(schedule.next_fire_times) == 5
        ticks = [t.ToMilliseconds() for t in schedule.next_fire_times]
        assert [b - a for a, b in itertools.pairwise(ticks)] == [1000] * 4

        async def started() -> pb.ScheduleFiring | None:
            now = await client.get_schedule(schedule.schedule_id)
            return next((f for f in now.recent_firings if f.outcome == STARTED), None)

        firing = await eventually(started, "a tick to start a run", timeout_s=FIRE_WAIT_S)
        assert firing.run_id and firing.tick_time.ToMilliseconds() % 1000 == 0
        assert firing.fire_time.ToMilliseconds() >= firing.tick_time.ToMilliseconds()

        run = await ended(client, firing.run_id)
        assert run.schedule_id == schedule.schedule_id and run.input == TWO

        # Paused: no next fire time. Every run a recorded firing started is listed by
        # the schedule (a firing is recorded after its run started, so read them first).
        paused = await client.pause_schedule(schedule.schedule_id)
        assert paused.paused and list(paused.next_fire_times) == []
        firings = (await client.list_schedule_runs(schedule.schedule_id)).firings
        started_ids = {f.run_id for f in firings if f.outcome == STARTED}
        assert firing.run_id in started_ids
        runs = await client.list_runs(schedule_id=schedule.schedule_id)
        assert started_ids <= {r.run_id for r in runs.runs}
        assert {r.schedule_id for r in runs.runs} == {schedule.schedule_id}
        other = await client.create_schedule("scripted", "@yearly", TWO, paused=True)
        assert list((await client.list_runs(schedule_id=other.schedule_id)).runs) == []
        await client.delete_schedule(schedule.schedule_id)


async def test_a_new_cron_makes_a_paused_schedule_fire_every_second(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        schedule = await client.create_schedule("scripted", "@yearly", TWO, paused=True)
        await client.update_schedule(schedule.schedule_id, cron=EVERY_SECOND, paused=False)

        async def started() -> pb.ScheduleFiring | None:
            page = await client.list_schedule_runs(schedule.schedule_id)
            return next((f for f in page.firings if f.outcome == STARTED), None)

        firing = await eventually(started, "a tick of the new cron", timeout_s=FIRE_WAIT_S)
        run = await ended(client, firing.run_id)
        assert run.schedule_id == schedule.schedule_id
        await client.delete_schedule(schedule.schedule_id)


async def test_a_run_with_a_goal_streams_its_verdicts_and_finishes_with_goal_met(
    keel: Keel,
) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        handle = client.stream("scripted", goal_script(2), goal=goal())
        events = [event async for event in handle.events()]
        assert_goal_met_on_attempt_2(events)
        assert text_of(events) == f"t0 done not yett1 done {SATISFIED}"
        assert handle.run_id is not None
        assert handle.snapshot is not None and handle.snapshot.run.goal == goal()
        assert_goal_run(await client.get_run(handle.run_id))

        # start_run, then the run's events.
        run = await client.start_run("scripted", goal_script(2), goal=goal())
        assert run.goal == goal()
        assert_goal_met_on_attempt_2([e async for e in client.run(run.run_id).events()])
        assert_goal_run(await client.get_run(run.run_id))

        # A thread's turn.
        thread = await client.create_thread()
        turn = client.send(thread.thread_id, "scripted", goal_script(2), goal=goal())
        assert_goal_met_on_attempt_2([e async for e in turn.events()])

        # Never met: the run finishes with goal_met false after max_attempts.
        short = client.stream("scripted", goal_script(3), goal=goal(max_attempts=2))
        missed = [e async for e in short.events()]
        assert evaluations(missed) == [(1, False, 2), (2, False, 2)]
        assert missed[-1].finish.HasField("goal_met") and not missed[-1].finish.goal_met

        # Without a goal: no verdict, goal_met unset.
        plain = [e async for e in client.stream("scripted", goal_script(1)).events()]
        assert evaluations(plain) == [] and not plain[-1].finish.HasField("goal_met")

        # A judge that is no agent of the server.
        bad = pb.Goal(objective="x", judge_agent_id="nobody")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [e async for e in client.stream("scripted", TWO, goal=bad).events()]
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.start_run("scripted", TWO, goal=pb.Goal(judge_agent_id=JUDGE))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_schedule_with_a_goal_gives_it_to_every_run(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        schedule = await client.create_schedule(
            "scripted", "@yearly", goal_script(2), paused=True, goal=goal()
        )
        fired = await client.trigger_schedule(schedule.schedule_id)
        assert fired.run.goal == goal()
        assert_goal_met_on_attempt_2([e async for e in client.run(fired.run.run_id).events()])
        assert_goal_run(await client.get_run(fired.run.run_id))


async def test_schedule_errors(keel: Keel) -> None:
    async with KeelClient(f"127.0.0.1:{keel.port}", **FAST) as client:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: client.get_schedule(UNKNOWN),
            lambda: client.update_schedule(UNKNOWN, paused=True),
            lambda: client.pause_schedule(UNKNOWN),
            lambda: client.resume_schedule(UNKNOWN),
            lambda: client.delete_schedule(UNKNOWN),
            lambda: client.trigger_schedule(UNKNOWN),
            lambda: client.list_schedule_runs(UNKNOWN),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await call()
            assert_code(missing.value, grpc.StatusCode.NOT_FOUND, "SCHEDULE_NOT_FOUND")

        # Bad fields are field violations of INVALID_ARGUMENT (a malformed field first,
        # then what needs the server's state: the agent, the cron, the policy).
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await client.create_schedule("scripted", "@daily", TWO, catch_up_window=0.5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in field_violations(bad.value)] == ["catch_up_window"]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await client.create_schedule(
                "nobody",
                "61 * * * *",
                TWO,
                timezone="Mars/Olympus",
                overlap_policy=pb.SCHEDULE_OVERLAP_POLICY_ENQUEUE,  # THREADED only
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = {field for field, _ in field_violations(bad.value)}
        assert {"agent_id", "overlap_policy"} <= fields and fields & {"cron", "timezone"}, fields

        schedule = await client.create_schedule(
            "scripted", "@daily", TWO, schedule_id="taken", request_id="create-1"
        )
        # The same request again: the same schedule; another request for its id: ALREADY_EXISTS.
        again = await client.create_schedule(
            "scripted", "@daily", TWO, schedule_id="taken", request_id="create-1"
        )
        assert again.schedule_id == "taken" and again.create_time == schedule.create_time
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            await client.create_schedule("scripted", "@hourly", TWO, schedule_id="taken")
        assert_code(taken.value, grpc.StatusCode.ALREADY_EXISTS, "SCHEDULE_ALREADY_EXISTS")

        # No change at all, or a bad one, is INVALID_ARGUMENT; the schedule is unchanged.
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await client.update_schedule("taken")
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await client.update_schedule("taken", cron="not a cron", input="kept?")
        assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await client.get_schedule("taken")).cron == "@daily"
        # A keyword that names no updatable field never reaches the server.
        changes: dict[str, Any] = {"thread_mode": pb.SCHEDULE_THREAD_MODE_THREADED}
        with pytest.raises(TypeError, match="thread_mode"):
            await client.update_schedule("taken", **changes)
        await client.delete_schedule("taken")


# The blocking client.


async def test_sync_schedule_helpers(keel: Keel) -> None:
    target = f"127.0.0.1:{keel.port}"

    def use() -> None:
        with blocking_client.KeelClient(target, **FAST) as client:
            schedule = client.create_schedule(
                "scripted", "@yearly", TWO, schedule_id="sync", catch_up_window=60.0
            )
            assert schedule.schedule_id == "sync" and schedule.catch_up_window.seconds == 60
            assert len(schedule.next_fire_times) == 5
            assert client.get_schedule("sync").cron == "@yearly"
            assert [s.schedule_id for s in client.list_schedules().schedules] == ["sync"]

            paused = client.pause_schedule("sync")
            assert paused.paused and list(paused.next_fire_times) == []
            changed = client.update_schedule("sync", input=goal_script(2), goal=goal())
            assert changed.paused and changed.goal == goal() and changed.cron == "@yearly"

            fired = client.trigger_schedule("sync", request_id="once")
            assert fired.firing.outcome == TRIGGERED and fired.run.schedule_id == "sync"
            assert client.trigger_schedule("sync", request_id="once").run.run_id == fired.run.run_id
            events = list(client.run(fired.run.run_id).events())
            assert_goal_met_on_attempt_2(events)
            assert_goal_run(client.get_run(fired.run.run_id))
            firings = client.list_schedule_runs("sync").firings
            assert [(f.outcome, f.run_id) for f in firings] == [(TRIGGERED, fired.run.run_id)]
            runs = client.list_runs(schedule_id="sync").runs
            assert [r.run_id for r in runs] == [fired.run.run_id]

            # A goal on a run of its own.
            handle = client.stream("scripted", goal_script(2), goal=goal())
            assert_goal_met_on_attempt_2(list(handle.events()))
            started = client.start_run("scripted", goal_script(2), goal=goal())
            assert_goal_met_on_attempt_2(list(client.run(started.run_id).events()))

            # Every second, by itself, once resumed with a new cron.
            client.update_schedule("sync", cron=EVERY_SECOND, paused=False)

            def ticked() -> pb.ScheduleFiring | None:
                page = client.list_schedule_runs("sync")
                return next((f for f in page.firings if f.outcome == STARTED), None)

            tick = eventually_sync(ticked, "a tick of the resumed schedule", FIRE_WAIT_S)
            assert tick.run_id in [r.run_id for r in client.list_runs(schedule_id="sync").runs]
            client.resume_schedule("sync")  # already running: changes nothing but update_time

            client.delete_schedule("sync")
            with pytest.raises(grpc.RpcError) as gone:
                client.get_schedule("sync")
            assert_code(gone.value, grpc.StatusCode.NOT_FOUND, "SCHEDULE_NOT_FOUND")

    await blocking(use)
