"""Metrics over HTTP from real server processes: a run, a replay and a takeover, counted."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.conftest import (
    Cluster,
    assert_run_invariants,
    expected_text,
    free_port,
    kinds,
    observe_all,
    script,
)
from tests.chaos.test_takeover import TEXT_AND_RECORDS, start_run, watch_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample at http://127.0.0.1:port/metrics, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def ended_run_counted(port: int) -> Samples:
    """The server's metrics once its run has ended there: the run's task counts its end,
    and leaves, a moment after its last event is out (a bound, not a timing goal)."""
    for _ in range(1000):
        metrics = scrape(port)
        ended = value(metrics, "keel_runs_ended_total", agent="scripted", state="succeeded")
        if ended >= 1 and value(metrics, "keel_runs_active") == 0:
            break
        await asyncio.sleep(0.01)
    return metrics


async def test_a_run_a_replay_and_a_takeover_are_counted(cluster: Cluster) -> None:
    port_a, port_b = free_port(), free_port()
    a = await cluster.start(KEEL_METRICS_PORT=str(port_a))
    b = await cluster.start(KEEL_METRICS_PORT=str(port_b))
    # A run that ends on the server that started it, streamed live.
    async with grpc.aio.insecure_channel(a.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        streamed = []
        async for response in stub.Stream(
            pb.StreamRequest(agent_id="scripted", input=script({"text": 5}))
        ):
            streamed.extend(response.events.events)
    on_a = await ended_run_counted(port_a)
    assert value(on_a, "keel_runs_started_total", agent="scripted") == 1
    assert value(on_a, "keel_runs_ended_total", agent="scripted", state="succeeded") == 1
    assert value(on_a, "keel_events_appended_total") == len(streamed)
    assert value(on_a, "keel_append_batch_events_sum") == len(streamed)
    assert value(on_a, "keel_rpc_duration_seconds_count", method="Stream", code="OK") == 1
    assert value(on_a, "keel_streams_open", rpc="Stream") == 0
    assert value(on_a, "keel_asyncio_tasks") >= 1  # the server's own tasks, at least

    # A replay on B: every event from the log, in catch-up pages.
    replayed = await observe_all(b.target, streamed[0].run_id)
    on_b = scrape(port_b)
    assert len(replayed) == len(streamed)
    assert value(on_b, "keel_events_served_total", source="log") == len(streamed)
    assert value(on_b, "keel_catch_up_pages_total") >= 1
    assert value(on_b, "keel_rpc_duration_seconds_count", method="Observe", code="OK") == 1

    # A takeover: A is killed mid-run, B takes the run over and finishes it.
    run_id = await start_run(a, script(*TEXT_AND_RECORDS))
    await watch_until(a, run_id, lambda seen: kinds(seen).count("text_delta") >= 40)
    a.kill()
    events = await observe_all(b.target, run_id)
    assert_run_invariants(events, expected_text(*TEXT_AND_RECORDS))
    on_b = await ended_run_counted(port_b)
    assert value(on_b, "keel_takeovers_total") == 1
    assert value(on_b, "keel_runs_ended_total", agent="scripted", state="succeeded") == 1
    assert value(on_b, "keel_runs_started_total", agent="scripted") == 0  # A stored it
    assert value(on_b, "keel_runs_active") == 0
