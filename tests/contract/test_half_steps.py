"""A run executed one half-step at a time (what each Temporal activity does) streams the
same events as a run executed in one go, on both backends: no step_superseded at a
clean stop, every tool called once, task updates kept across the stops."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from server.agents.checkpoint import Checkpoint, Phase
from server.agents.testing import registry
from server.events.log import EventLog, RunState
from server.runs.executor import LocalExecutor

STEPS: list[dict[str, Any]] = [
    {"text": 3},
    {"tool": "record", "args": {"key": "a"}},
    {"tool": "slow", "args": {"key": "s", "duration_ms": 300}},
    {"text": 2},
]


def kinds(events: list[Any]) -> list[str]:
    return [e.WhichOneof("payload") for e in events]


async def run_whole(log: EventLog) -> list[Any]:
    executor = LocalExecutor(log, registry, instance_id="whole")
    executor.open(sweep=False)
    started = await executor.start("scripted", json.dumps({"steps": STEPS}), until_idle=True)
    started.launch()
    while not (await log.get_run(started.run.run_id)).state.terminal:
        await asyncio.sleep(0.02)
    await executor.drain(0)
    return await log.read(started.run.run_id, 0, 10_000)


async def test_half_steps_stream_what_one_go_streams(event_log: EventLog) -> None:
    executor = LocalExecutor(event_log, registry, instance_id="worker")
    executor.open(sweep=False)
    started = await executor.start("scripted", json.dumps({"steps": STEPS}), until_idle=True)
    run_id = started.run.run_id
    boundaries: list[Phase] = []
    for _ in range(50):
        task = await executor.execute(run_id, half_step=True)
        assert task is not None
        boundary = await asyncio.wait_for(task, 30)
        record = await event_log.get_run(run_id)
        if boundary is None:
            break
        boundaries.append(boundary)
        # A clean stop: the checkpoint covers every event written.
        assert record.state is RunState.RUNNING
        assert Checkpoint.decode(record.checkpoint).next_index == record.next_index
    assert record.state is RunState.SUCCEEDED
    await executor.drain(0)
    events = await event_log.read(run_id, 0, 10_000)
    assert [e.index for e in events] == list(range(len(events)))
    assert "step_superseded" not in kinds(events)
    # Two steps with tool calls: a stop after each response and after each step.
    assert boundaries[:4] == [Phase.RESPONSE, Phase.STEP, Phase.RESPONSE, Phase.STEP]
    assert await event_log.get_counter(run_id, "a") == 1
    whole = await run_whole(event_log)
    steps = [k for k in kinds(whole) if k not in ("task",)]
    assert [k for k in kinds(events) if k not in ("task",)] == steps
    statuses = [e.task.status for e in events if e.WhichOneof("payload") == "task"]
    assert statuses == [e.task.status for e in whole if e.WhichOneof("payload") == "task"]
