"""Logs: JSON lines naming the run (and its thread) wherever a run's code logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from server import logs
from server.agents.testing import registry
from server.events.memory import MemoryEventLog
from server.runs.executor import LocalExecutor


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """Where the test has logs.configure write; the root logger restored afterwards."""
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_json_lines_carry_the_run_and_thread_only_where_known(stderr: io.StringIO) -> None:
    logs.configure("INFO", "json", stderr)
    log = logging.getLogger("keel.test")

    async def in_a_run() -> None:
        log.warning("inside %s", "the run")

    log.info("outside")
    await asyncio.create_task(in_a_run(), context=logs.run_task_context("run-1", "thread-1"))
    log.debug("below the level")
    outside, inside = lines(stderr)
    assert outside["message"] == "outside" and outside["level"] == "INFO"
    assert outside["logger"] == "keel.test" and "time" in outside
    assert "run_id" not in outside and "thread_id" not in outside
    assert inside["message"] == "inside the run"
    assert (inside["run_id"], inside["thread_id"]) == ("run-1", "thread-1")


async def test_a_failing_run_logs_its_failure_with_its_run_id(stderr: io.StringIO) -> None:
    logs.configure("INFO", "json", stderr)
    executor = LocalExecutor(MemoryEventLog(), registry, instance_id="test")
    started = await executor.start("scripted", json.dumps({"steps": [{"error": "provider down"}]}))
    started.launch()
    await asyncio.gather(*executor._tasks.values())
    failed = [line for line in lines(stderr) if "failed" in line["message"]]
    assert failed and failed[0]["run_id"] == started.run.run_id
    await executor.drain(0)


def test_text_format_is_one_plain_line(stderr: io.StringIO) -> None:
    logs.configure("warning", "text", stderr)
    logging.getLogger("keel.test").warning("plain")
    logging.getLogger("keel.test").info("hidden")
    [line] = stderr.getvalue().splitlines()
    assert line.endswith("WARNING keel.test: plain")
