"""Tracing is off unless the standard OTEL_* variables ask for an OTLP exporter."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider

from server import tracing


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
    ):
        monkeypatch.delenv(name, raising=False)


def test_off_by_default() -> None:
    assert tracing.from_environment() is None
    assert tracing.current_context() == ""  # nothing is stored with runs either


def test_an_otlp_endpoint_turns_it_on_with_the_service_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "keel-test")
    provider = tracing.from_environment()
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "keel-test"
    provider.shutdown()


def test_none_keeps_it_off_even_with_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.from_environment() is None
