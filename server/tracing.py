"""Traces with OpenTelemetry: the gRPC server's calls, and a run's spans wherever it runs.

Off by default. `from_environment()` turns it on when the standard OTEL_*
variables ask for an exporter (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_TRACES_EXPORTER=otlp): spans go
to that OTLP endpoint in batches, named after OTEL_SERVICE_NAME ("keel").

When on:
- every AgentService call is a server span (opentelemetry-instrumentation-grpc);
- the trace context of the call that made a run is stored with the run
  (RunRecord.trace_context, W3C traceparent); the instance that executes the
  run, first or after a takeover, opens a `keel.run` span in that trace, so
  one trace holds every attempt of a run, on every instance;
- inside it, a `keel.step` span per step, and pydantic-ai's own
  instrumentation adds a span per model request and per tool call (message
  contents left out).

A process has one tracer provider; tests enable one with an in-memory
exporter.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from pydantic_ai import Agent
from pydantic_ai.models.instrumented import InstrumentationSettings

_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_EXPORTER_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def from_environment() -> TracerProvider | None:
    """A provider exporting over OTLP if the OTEL_* environment asks for it, else None."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter == "none" or not (
        exporter == "otlp" or any(os.environ.get(name) for name in _EXPORTER_VARIABLES)
    ):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME", "keel")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def enable(provider: TracerProvider) -> None:
    """Trace with `provider` from now on (and pydantic-ai's model requests and tools)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("keel")
    Agent.instrument_all(InstrumentationSettings(tracer_provider=provider, include_content=False))


def disable() -> None:
    global _tracer, _provider
    _tracer = _provider = None
    Agent.instrument_all(False)


def provider() -> TracerProvider | None:
    return _provider


def server_interceptors() -> list[Any]:
    """The gRPC server interceptors tracing needs: none while it is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider)]  # type: ignore[no-untyped-call]


def connect_interceptors() -> list[Any]:
    """The HTTP port's (Connect, gRPC-Web) interceptors tracing needs: none while it is off."""
    if _provider is None:
        return []
    from connectrpc_otel import OpenTelemetryInterceptor

    return [OpenTelemetryInterceptor(tracer_provider=_provider)]


def current_context() -> str:
    """The current trace context as a W3C carrier (JSON), "" when tracing is off."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    inject(carrier)
    return json.dumps(carrier) if carrier else ""


@contextlib.contextmanager
def run_span(
    run_id: str, agent_id: str, epoch: int, trace_context: str
) -> Iterator[trace.Span | None]:
    """A `keel.run` span for one instance's execution of a run, in the trace of the
    request that made it; None while tracing is off."""
    if _tracer is None:
        yield None
        return
    parent = extract(json.loads(trace_context)) if trace_context else otel_context.Context()
    attributes: dict[str, str | int] = {
        "keel.run_id": run_id,
        "keel.agent_id": agent_id,
        "keel.epoch": epoch,
    }
    with _tracer.start_as_current_span(
        "keel.run", context=parent, kind=trace.SpanKind.INTERNAL, attributes=attributes
    ) as span:
        yield span


@contextlib.contextmanager
def step_span(step: int) -> Iterator[trace.Span | None]:
    """A `keel.step` span around one step of the agent loop (None while off). A step
    stopped at a half-step boundary is not an error: exceptions are not recorded."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(
        "keel.step",
        attributes={"keel.step": step},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span
