"""Traces: the gRPC call that made a run, the run, its steps, its model requests and tool
calls in one trace, which a takeover by another instance continues (in-memory exporter)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel.v1.agent_service_connect import AgentServiceClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server import tracing
from server.app import Keel
from tests.integration.conftest import collect, payloads, record, script, text


@pytest.fixture
def backend() -> str:
    return "redis"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()


async def finished(spans: InMemorySpanExporter, call: str, *also: str) -> tuple[ReadableSpan, ...]:
    """Every finished span, once the server span of `call` and a span of each name in
    `also` have ended too (they end a moment after the client saw the run's last event:
    the run's span when its supervisor has wound down)."""
    for _ in range(500):
        found = tuple(spans.get_finished_spans())
        if any(s.name.endswith(f"AgentService/{call}") for s in found) and all(
            named(found, name) for name in also
        ):
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"no span of {call}: {[s.name for s in spans.get_finished_spans()]}")


def named(found: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def parent_of(span: ReadableSpan, found: tuple[ReadableSpan, ...]) -> ReadableSpan:
    assert span.parent is not None
    [parent] = [s for s in found if s.context.span_id == span.parent.span_id]
    return parent


def ancestors(span: ReadableSpan, found: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    chain = []
    while span.parent is not None:
        span = parent_of(span, found)
        chain.append(span)
    return chain


async def test_a_run_is_one_trace_from_the_call_to_its_tools(
    spans: InMemorySpanExporter, start_keel: Any
) -> None:
    keel: Keel = await start_keel()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        request = pb.StreamRequest(agent_id="scripted", input=script(record("k"), text(2)))
        out = await collect(stub.Stream(request))
    assert payloads(out.events)[-1] == "finish"
    found = await finished(spans, "Stream", "keel.run")
    [call] = [s for s in found if s.name.endswith("AgentService/Stream")]
    [run] = named(found, "keel.run")
    assert run.attributes is not None and run.attributes["keel.run_id"] == out.run_id
    assert parent_of(run, found) is call
    steps = named(found, "keel.step")
    assert [s.attributes["keel.step"] for s in steps if s.attributes] == [1, 2]
    # Under the run (and pydantic-ai's span of the agent run it drives).
    assert all(run in ancestors(step, found) for step in steps)
    # pydantic-ai's spans: a model request per step and the tool call, inside the steps.
    inside = [s for s in found if any(step in ancestors(s, found) for step in steps)]
    assert len(inside) >= 3, [s.name for s in found]
    assert any("record" in s.name for s in inside), [s.name for s in inside]
    assert {s.context.trace_id for s in found} == {call.context.trace_id}


async def test_a_run_started_over_connect_is_in_the_trace_of_its_call(
    spans: InMemorySpanExporter, start_keel: Any
) -> None:
    keel: Keel = await start_keel(http_port=0)
    assert keel.http is not None
    async with AgentServiceClient(f"http://127.0.0.1:{keel.http.port}") as web:
        request = pb.StreamRequest(agent_id="scripted", input=script(record("k"), text(2)))
        out = [response async for response in web.stream(request)]
    run_id = out[0].snapshot.run.run_id
    found = await finished(spans, "Stream", "keel.run")
    [call] = [s for s in found if s.name.endswith("AgentService/Stream")]
    [run] = named(found, "keel.run")
    assert run.attributes is not None and run.attributes["keel.run_id"] == run_id
    assert parent_of(run, found) is call
    assert {s.context.trace_id for s in found} == {call.context.trace_id}


async def test_a_run_taken_over_by_another_instance_continues_its_trace(
    spans: InMemorySpanExporter, start_keel: Any
) -> None:
    first: Keel = await start_keel(lease_ttl_s=1.0, sweep_interval_s=0.1)
    second: Keel = await start_keel(lease_ttl_s=1.0, sweep_interval_s=0.1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        started = await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(200, delay_ms=10)))
        )
        run_id = started.run.run_id
        while (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.next_offset < 20:
            await asyncio.sleep(0.01)
    await first.stop(grace_s=0)  # hands the run back; the second instance takes it over
    async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        out = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id)))
    assert payloads(out.events)[-1] == "finish"
    for _ in range(500):  # the second instance's run span ends just after the finish
        found = await finished(spans, "StartRun")
        if len(named(found, "keel.run")) >= 2:
            break
        await asyncio.sleep(0.01)
    [call] = [s for s in found if s.name.endswith("AgentService/StartRun")]
    runs = named(found, "keel.run")
    epochs = sorted(s.attributes["keel.epoch"] for s in runs if s.attributes)
    assert len(runs) == 2 and epochs[0] < epochs[1]  # one per instance
    assert {s.context.trace_id for s in runs} == {call.context.trace_id}
    assert all(parent_of(s, found) is call for s in runs)
