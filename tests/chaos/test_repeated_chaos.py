"""20 runs on 3 instances, 10 random SIGKILLs while they run: every run finishes, exactly once.

With KEEL_CHAOS_KILLS=N set (scripts/chaos; never in CI) the long mode runs
instead: N SIGKILLs across 3 instances, runs started all along and each one
followed by a client, and a report with the takeover times (long_mode.py).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from keel.v1 import agent_service_pb2 as pb
from keel_client import KeelClient

from server.events.log import EventLog
from tests.chaos.conftest import (
    Cluster,
    assert_run_invariants,
    expected_text,
    free_port,
    observe_all,
    script,
    wait_for,
)
from tests.chaos.long_mode import LongChaos, kills_requested, report_path, write_report

RUNS = 20
KILLS = 10
SEED = 20261122


def steps_for(i: int) -> tuple[dict[str, Any], ...]:
    return (
        {"text": 20 + i, "delay_ms": 15},
        {"tool": "record", "args": {"key": "a", "delay_ms": 50}},
        {"text": 20, "delay_ms": 15},
        {"tool": "record", "args": {"key": "b"}},
        {"text": 10, "delay_ms": 15},
    )


LONG_KILLS = kills_requested()


@pytest.mark.skipif(LONG_KILLS > 0, reason="KEEL_CHAOS_KILLS selects the long mode")
async def test_runs_finish_exactly_once_through_repeated_sigkills(
    cluster: Cluster, store: EventLog
) -> None:
    rng = random.Random(SEED)
    ports = [free_port() for _ in range(3)]
    instances = {port: await cluster.start(port=port) for port in ports}
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)

    async with KeelClient(target, initial_backoff_s=0.05, max_backoff_s=0.5) as client:
        run_ids = [
            (await client.start_run("scripted", script(*steps_for(i)))).run_id for i in range(RUNS)
        ]
        # A resumable client follows every run through the chaos.
        followers = [asyncio.create_task(_follow(client, run_id)) for run_id in run_ids]

        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            port = rng.choice(ports)
            instances[port].kill()
            await instances[port].wait()
            instances[port] = await cluster.start(port=port)

        async def all_ended() -> bool:
            runs = [await store.get_run(run_id) for run_id in run_ids]
            return all(run.state.terminal for run in runs)

        await wait_for(all_ended, timeout_s=120, what="every run to end")
        followed = await asyncio.wait_for(asyncio.gather(*followers), 60)

    for i, (run_id, seen) in enumerate(zip(run_ids, followed, strict=True)):
        steps = steps_for(i)
        assert (await store.get_run(run_id)).state.value == "succeeded"
        events = await observe_all(f"127.0.0.1:{ports[0]}", run_id)
        assert_run_invariants(events, expected_text(*steps))
        assert [e.SerializeToString() for e in seen] == [e.SerializeToString() for e in events]
        counts = {key: await store.get_counter(run_id, key) for key in ("a", "b")}
        assert counts == {"a": 1, "b": 1}, (run_id, counts)


async def _follow(client: KeelClient, run_id: str) -> list[pb.AgentEvent]:
    return [event async for event in client.run(run_id).events()]


if LONG_KILLS:  # the long mode exists only when asked for (scripts/chaos), not in CI

    @pytest.mark.timeout(300 + 20 * LONG_KILLS)
    async def test_long_mode_many_sigkills_with_runs_all_along(
        cluster: Cluster, store: EventLog
    ) -> None:
        result = await LongChaos(cluster, store, LONG_KILLS).run()
        write_report(result, report_path())  # before the verdict: a failure is in the report
        assert result["tally"]["runs_succeeded"] > 0
        assert not result["failures"], result["failures"]
