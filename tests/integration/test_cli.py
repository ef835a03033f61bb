"""The `keel` command against real servers (typer's CliRunner in a thread: the server runs
in this test's event loop), and `keel runs watch` across a server restart."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from keel_client import KeelClient
from keel_client.cli import app
from typer.testing import CliRunner, Result

from server.app import Keel
from server.auth.keys import Role, add_key
from tests.integration.conftest import record, script, text
from tests.processes import ROOT, start_keel_process
from tests.temporal import free_port

APPROVE = {"tool": "approve_me", "args": {"action": "deploy"}}
SLOW = {"tool": "slow", "args": {"key": "s", "duration_ms": 30_000}}


@pytest.fixture
def backend() -> str:
    return "redis"


async def keel(*args: str) -> Result:
    """`keel ARGS...`, in a thread so that this loop's servers keep serving."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


def lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def indices(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["index"]) for e in events]  # int64: a string in protobuf's JSON mapping


def kind(event: dict[str, Any]) -> str:
    """The payload of an event in JSON (the oneof member that is set)."""
    for name in ("finish", "suspended", "tool_call_approval", "tool_result", "abort", "error"):
        if event.get(name):
            return name
    return ""


async def test_runs_and_decisions(start_keel: Callable[..., Any]) -> None:
    server: Keel = await start_keel()
    at = ("--address", f"127.0.0.1:{server.port}")
    [agent, *_] = lines(await keel(*at, "agents", "--json"))
    assert agent["agent_id"]
    table = await keel(*at, "agents")
    assert table.exit_code == 0 and "scripted" in table.stdout

    [run] = lines(await keel(*at, "runs", "start", "scripted", script(text(3)), "--json"))
    watched = lines(await keel(*at, "runs", "watch", run["run_id"], "--json"))
    assert indices(watched) == list(range(len(watched)))
    assert kind(watched[-1]) == "finish"
    [got] = lines(await keel(*at, "runs", "get", run["run_id"], "--json"))
    assert got["state"] == "RUN_STATE_SUCCEEDED"
    assert run["run_id"] in {r["run_id"] for r in lines(await keel(*at, "runs", "list", "--json"))}
    later = lines(await keel(*at, "runs", "watch", run["run_id"], "--from", "3", "--json"))
    assert indices(later) == list(range(3, len(watched)))
    shown = await keel(*at, "runs", "watch", run["run_id"])
    assert shown.exit_code == 0 and "t0 t1 t2" in shown.stdout and "succeeded" in shown.stderr

    # A suspended run, approved from the command line.
    [held] = lines(
        await keel(*at, "runs", "start", "scripted", script(APPROVE, record("x")), "--json")
    )
    run_id = held["run_id"]
    for _ in range(500):
        [now] = lines(await keel(*at, "runs", "get", run_id, "--json"))
        if now["state"] == "RUN_STATE_SUSPENDED":
            break
        await asyncio.sleep(0.02)
    events = lines(await keel(*at, "runs", "watch", run_id, "--json"))
    call_id = next(e for e in events if "tool_call_approval" in e)["tool_call_approval"][
        "tool_call_id"
    ]
    lines(await keel(*at, "approve", run_id, call_id, "--json"))
    rest = lines(await keel(*at, "runs", "watch", run_id, "--through-suspension", "--json"))
    assert kind(rest[-1]) == "finish" and any(kind(e) == "tool_result" for e in rest)

    # A cancel, and an error's exit code and message.
    [slow] = lines(await keel(*at, "runs", "start", "scripted", script(text(500, 50)), "--json"))
    [cancelled] = lines(await keel(*at, "runs", "cancel", slow["run_id"], "--json"))
    assert cancelled["state"] == "RUN_STATE_CANCELLED"
    missing = await keel(*at, "runs", "get", "f" * 32)
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.stderr


async def test_threads_tasks_and_schedules(start_keel: Callable[..., Any]) -> None:
    server: Keel = await start_keel(tasks_poll_interval_s=0.05)
    at = ("--address", f"127.0.0.1:{server.port}")
    async with KeelClient(f"127.0.0.1:{server.port}") as client:
        thread = await client.create_thread(resource_id="cli")
    start = ("runs", "start", "scripted", script(text(2)), "--thread", thread.thread_id)
    [run] = lines(await keel(*at, *start, "--json"))
    lines(await keel(*at, "runs", "watch", run["run_id"], "--json"))
    listed = lines(await keel(*at, "threads", "list", "--json"))
    assert thread.thread_id in {t["thread_id"] for t in listed}
    [got] = lines(await keel(*at, "threads", "get", thread.thread_id, "--json"))
    assert int(got["message_count"]) >= 2
    messages = lines(await keel(*at, "threads", "messages", thread.thread_id, "--json"))
    assert len(messages) == int(got["message_count"])
    lines(await keel(*at, "threads", "delete", thread.thread_id, "--json"))
    gone = await keel(*at, "threads", "get", thread.thread_id)
    assert gone.exit_code == 1 and "NOT_FOUND" in gone.stderr

    [tasked] = lines(await keel(*at, "runs", "start", "scripted", script(SLOW, text(1)), "--json"))
    for _ in range(500):
        found = lines(await keel(*at, "tasks", "list", "--run", tasked["run_id"], "--json"))
        if found:
            break
        await asyncio.sleep(0.02)
    task_id = found[0]["task_id"]
    assert lines(await keel(*at, "tasks", "get", task_id, "--json"))[0]["task_id"] == task_id
    [cancelled] = lines(await keel(*at, "tasks", "cancel", task_id, "--json"))
    assert cancelled["status"] == "TASK_STATUS_CANCELLED"
    [again] = lines(await keel(*at, "tasks", "retry", task_id, "--json"))
    assert again["status"] in ("TASK_STATUS_QUEUED", "TASK_STATUS_RUNNING")
    lines(await keel(*at, "tasks", "cancel", task_id, "--json"))

    create = ("schedules", "create", "scripted", "0 6 * * *", script(text(1)))
    [schedule] = lines(await keel(*at, *create, "--timezone", "America/New_York", "--json"))
    schedule_id = schedule["schedule_id"]
    assert lines(await keel(*at, "schedules", "pause", schedule_id, "--json"))[0]["paused"]
    assert not lines(await keel(*at, "schedules", "resume", schedule_id, "--json"))[0].get("paused")
    [fired] = lines(await keel(*at, "schedules", "trigger", schedule_id, "--json"))
    assert fired["schedule_id"] == schedule_id
    listed = lines(await keel(*at, "schedules", "list", "--json"))
    assert schedule_id in {s["schedule_id"] for s in listed}
    assert lines(await keel(*at, "schedules", "get", schedule_id, "--json"))[0]["recent_firings"]
    table = await keel(*at, "schedules", "list")
    assert table.exit_code == 0 and "timezone" in table.stdout  # narrow: cells are cut
    lines(await keel(*at, "schedules", "delete", schedule_id, "--json"))
    gone = await keel(*at, "schedules", "get", schedule_id)
    assert gone.exit_code == 1 and "NOT_FOUND" in gone.stderr


async def test_api_keys_from_the_flag_or_the_environment(
    start_keel: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys.jsonl"
    key = add_key(keys, "acme", Role.READER)
    server: Keel = await start_keel(api_keys_file=str(keys))
    at = ("--address", f"127.0.0.1:{server.port}")
    refused = await keel(*at, "agents")
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.stderr
    assert lines(await keel(*at, "--api-key", key, "agents", "--json"))
    monkeypatch.setenv("KEEL_API_KEY", key)
    assert lines(await keel(*at, "agents", "--json"))
    denied = await keel(*at, "runs", "start", "scripted", script(text(1)))
    assert denied.exit_code == 1 and "PERMISSION_DENIED" in denied.stderr


async def test_watch_prints_every_event_once_across_a_server_restart(
    redis_url: str, key_prefix: str
) -> None:
    port = free_port()
    env = {"KEEL_SHUTDOWN_GRACE_S": "0", "KEEL_LEASE_TTL_S": "1", "KEEL_SWEEP_INTERVAL_S": "0.1"}
    first = await start_keel_process(redis_url=redis_url, key_prefix=key_prefix, port=port, env=env)
    processes = [first]
    watch = None
    try:
        at = ("--address", f"127.0.0.1:{port}")
        [run] = lines(await keel(*at, "runs", "start", "scripted", script(text(200, 10)), "--json"))
        watch = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from keel_client.cli import main; main()",
            *at,
            "runs",
            "watch",
            run["run_id"],
            "--json",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        assert watch.stdout is not None
        seen: list[dict[str, Any]] = []
        while len(seen) < 40:
            seen.append(json.loads(await asyncio.wait_for(watch.stdout.readline(), 30)))
        first.kill()  # the server the watch reads from, and the run's owner
        await first.wait()
        processes.append(
            await start_keel_process(redis_url=redis_url, key_prefix=key_prefix, port=port, env=env)
        )
        output, _ = await asyncio.wait_for(watch.communicate(), 60)
        seen += [json.loads(line) for line in output.decode().splitlines() if line.strip()]
        assert watch.returncode == 0
        assert indices(seen) == list(range(len(seen)))
        assert kind(seen[-1]) == "finish"
    finally:
        if watch is not None and watch.returncode is None:
            watch.kill()
        for process in processes:
            process.kill()
            await process.wait()
