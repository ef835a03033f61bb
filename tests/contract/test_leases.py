"""The LeaseKeeper on each backend: a refused renewal stops the run only when it was
taken over, not when its owner ended it a moment before dropping its lease."""

from __future__ import annotations

import asyncio

from keel.v1.agent_service_pb2 import AgentEvent, RunFinish

from server.events.log import EventLog, RunState
from server.runs.leases import LeaseKeeper
from tests.contract.test_event_log import OpenEventLog, new_run

RENEW_INTERVAL_S = 0.02


async def _given_up(keeper: LeaseKeeper, run_id: str) -> None:
    """Wait until the keeper no longer holds `run_id`."""
    async with asyncio.timeout(10):
        while keeper.holds(run_id):
            await asyncio.sleep(RENEW_INTERVAL_S)


async def _keeper(log: EventLog, lost: list[str]) -> LeaseKeeper:
    return LeaseKeeper(log, renew_interval_s=RENEW_INTERVAL_S, on_lost=lost.append)


async def test_a_run_its_owner_ended_is_dropped_without_calling_it_lost(
    open_event_log: OpenEventLog,
) -> None:
    log = await open_event_log()
    run = await new_run(log)
    lost: list[str] = []
    keeper = await _keeper(log, lost)
    try:
        keeper.hold(run.run_id, 1)
        # The owner commits the run's end at its epoch and has not dropped the lease yet.
        finish = AgentEvent(run_id=run.run_id, index=0, finish=RunFinish(output_text="done"))
        await log.append(run.run_id, 1, [finish], state=RunState.SUCCEEDED)
        await _given_up(keeper, run.run_id)
    finally:
        await keeper.close()
    assert lost == []


async def test_a_run_taken_over_is_reported_lost(open_event_log: OpenEventLog) -> None:
    log = await open_event_log()
    run = await new_run(log)
    lost: list[str] = []
    keeper = await _keeper(log, lost)
    try:
        keeper.hold(run.run_id, 1)
        assert await log.claim(run.run_id, "instance-b", force=True) is not None
        await _given_up(keeper, run.run_id)
    finally:
        await keeper.close()
    assert lost == [run.run_id]
