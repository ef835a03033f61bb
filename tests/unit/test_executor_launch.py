"""The executor's launch of a run it started: once, and only once, whatever calls it."""

from __future__ import annotations

import json

from server.agents.testing import registry
from server.events.log import RunState
from server.events.memory import MemoryEventLog
from server.runs.executor import LocalExecutor


async def test_a_started_run_is_launched_once_however_often_launch_is_called() -> None:
    log = MemoryEventLog()
    executor = LocalExecutor(log, registry, instance_id="test")
    started = await executor.start("scripted", json.dumps({"steps": [{"text": 2}]}))
    assert executor.running == frozenset()  # nothing runs until launched
    started.launch()
    started.launch()
    [task] = [t for t in executor._tasks.values()]
    await task
    assert (await log.get_run(started.run.run_id)).state is RunState.SUCCEEDED
    started.launch()  # e.g. the Stream's own finally, after the run ended
    assert executor.running == frozenset()
    await executor.drain(0)
