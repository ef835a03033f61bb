"""Logs: JSON lines (python-json-logger) or text, with what is known of the context.

Every record carries, when known, `run_id` and `thread_id` (set for the
code that executes a run, server/runs/supervisor.py), `tenant` (once
authentication names one) and `trace_id` (the current OpenTelemetry span's,
once tracing is on). They live in context variables, so a log line written
anywhere below a run's task names the run without passing it down.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

run_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("run_id", default="")
thread_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("thread_id", default="")
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")

LogFormat = Literal["json", "text"]
_CONTEXT = ("run_id", "thread_id", "tenant", "trace_id")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _trace_id() -> str:
    """The current span's trace id (32 hex digits), or "" without one."""
    try:
        from opentelemetry import trace
    except ImportError:
        return ""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


class ContextFilter(logging.Filter):
    """Adds the context's run_id, thread_id, tenant and trace_id to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = run_id_var.get()
        record.thread_id = thread_id_var.get()
        record.tenant = tenant_var.get()
        record.trace_id = _trace_id()
        return True


class _JsonLines(JsonFormatter):
    """One JSON object per line; the context's fields only where known."""

    def process_log_record(self, log_data: dict[str, object]) -> dict[str, object]:
        for name in _CONTEXT:
            if not log_data.get(name):
                log_data.pop(name, None)
        return log_data


def configure(level: str = "INFO", fmt: LogFormat = "json", stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr), as JSON lines or as text, from `level` up."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(
            _JsonLines(
                "%(levelname)s %(name)s %(message)s %(run_id)s %(thread_id)s %(tenant)s "
                "%(trace_id)s",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",
            )
        )
    else:
        handler.setFormatter(logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Alembic says at INFO what it does at every start on PostgreSQL (its plugins, "Context
    # impl", each revision): a dozen lines of noise; its warnings and errors still show.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


def run_task_context(run_id: str, thread_id: str = "") -> contextvars.Context:
    """A context for a run's task (asyncio.create_task(..., context=...)): the task,
    and every task it starts, logs with the run's id and thread."""
    context = contextvars.copy_context()
    context.run(run_id_var.set, run_id)
    context.run(thread_id_var.set, thread_id)
    return context


@contextlib.contextmanager
def run_context(run_id: str, thread_id: str = "") -> Iterator[None]:
    """Name the run (and its thread) in every record logged inside the block."""
    run_token = run_id_var.set(run_id)
    thread_token = thread_id_var.set(thread_id)
    try:
        yield
    finally:
        thread_id_var.reset(thread_token)
        run_id_var.reset(run_token)
