"""Keel as an A2A client (server/a2a/remote.py, docs/a2a-client.md): a Keel agent calls a
second Keel server's agent over A2A, and survives the SIGKILL of its own server mid-call.

Two clusters, as real server processes on one Redis with their own key
prefixes: the remote (the scripted agent, served over A2A on its HTTP port)
and the caller (tests/a2a_registry.py), whose servers are killed and
replaced. The invariants: the remote has exactly one task per call, the
caller's run ends with the remote's whole text, and a call that completed is
never repeated.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.a2a.remote import RemoteAgent, message_ids
from server.auth.keys import Role, add_key
from server.events.redis import RedisEventLog
from server.runs.journal import NOTE_SUFFIX
from tests.a2a_registry import REMOTE_KEY_ENV, REMOTE_URL_ENV
from tests.processes import KeelProcess, start_keel_process
from tests.temporal import WorkerProcess, start_worker

CALLER_ENV = {
    "KEEL_LEASE_TTL_S": "1",
    "KEEL_SWEEP_INTERVAL_S": "0.2",
    "KEEL_HEARTBEAT_INTERVAL_S": "0.2",
    "KEEL_SHUTDOWN_GRACE_S": "0",
}
PATIENCE_S = 60.0  # a bound on waiting for a state, not a timing goal


def remote_script(deltas: int, delay_ms: int = 0) -> str:
    return json.dumps({"steps": [{"text": deltas, "delay_ms": delay_ms}]})


def remote_text(deltas: int) -> str:
    """What the scripted agent streams (and so answers over A2A): its deltas, then "done"."""
    return "".join(f"t{i} " for i in range(deltas)) + "done"


def plan(*calls: dict[str, Any], then_text: int = 0, delay_ms: int = 0) -> str:
    return json.dumps({"calls": list(calls), "then_text": then_text, "delay_ms": delay_ms})


def kinds(events: Sequence[pb.AgentEvent]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]


def effective(events: Sequence[pb.AgentEvent]) -> list[pb.AgentEvent]:
    """The events without those of superseded attempts (what a client keeps)."""
    dropped: set[int] = set()
    for event in events:
        if event.WhichOneof("payload") == "step_superseded":
            dropped.update(range(event.step_superseded.from_index, event.index))
    return [e for e in events if e.index not in dropped]


def outputs(events: Sequence[pb.AgentEvent], tool_call_id: str) -> list[dict[str, Any]]:
    return [
        json.loads(e.tool_output.output_json)
        for e in events
        if e.WhichOneof("payload") == "tool_output" and e.tool_output.tool_call_id == tool_call_id
    ]


def reassembled(values: Sequence[dict[str, Any]], artifact_id: str = "text") -> str:
    """The remote's text artifact rebuilt from a call's outputs (append semantics)."""
    text = ""
    for value in values:
        if value.get("artifact_id") == artifact_id:
            chunk = value.get("text", "")
            text = text + chunk if value.get("append") else chunk
    return text


class Servers:
    """The remote server and the caller's servers of one test; killed at its end."""

    def __init__(self, redis_url: str, key_prefix: str) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.processes: list[KeelProcess] = []
        self.remote: KeelProcess | None = None

    @property
    def remote_url(self) -> str:
        assert self.remote is not None
        return f"http://127.0.0.1:{self.remote.http_port}/a2a/scripted"

    async def start_remote(
        self, env: dict[str, str] | None = None, http_port: str = "0"
    ) -> KeelProcess:
        self.remote = await start_keel_process(
            redis_url=self.redis_url,
            key_prefix=f"{self.key_prefix}-remote",
            args=["--http-port", http_port],
            env=env,
        )
        self.processes.append(self.remote)
        return self.remote

    async def start_caller(
        self, env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> KeelProcess:
        process = await start_keel_process(
            redis_url=self.redis_url,
            key_prefix=f"{self.key_prefix}-caller",
            agents="tests.a2a_registry:registry",
            env={**CALLER_ENV, REMOTE_URL_ENV: self.remote_url, **(env or {})},
            args=args,
        )
        self.processes.append(process)
        return process

    async def note(self, run_id: str, tool_call_id: str) -> bytes | None:
        """What the caller's journal noted for a call."""
        log = await RedisEventLog.connect(self.redis_url, key_prefix=f"{self.key_prefix}-caller")
        try:
            return await log.journaled_tool(run_id, tool_call_id + NOTE_SUFFIX)
        finally:
            await log.close()

    async def stop_all(self) -> None:
        for process in self.processes:
            process.kill()
            await process.wait()


@pytest.fixture
async def no_servers(redis_url: str, key_prefix: str) -> AsyncIterator[Servers]:
    """Servers the test starts itself."""
    group = Servers(redis_url, key_prefix)
    try:
        yield group
    finally:
        await group.stop_all()


@pytest.fixture
async def servers(no_servers: Servers) -> Servers:
    """A remote without API keys, started."""
    await no_servers.start_remote()
    return no_servers


async def start_run(caller: KeelProcess, input_: str) -> str:
    async with grpc.aio.insecure_channel(caller.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        started = await stub.StartRun(pb.StartRunRequest(agent_id="caller", input=input_))
        return started.run.run_id


async def observe(
    caller: KeelProcess,
    run_id: str,
    until: Callable[[list[pb.AgentEvent]], bool] | None = None,
) -> list[pb.AgentEvent]:
    """The run's events from its start: to its end, or until `until` holds for them."""
    events: list[pb.AgentEvent] = []
    async with grpc.aio.insecure_channel(caller.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        async with asyncio.timeout(PATIENCE_S):
            async for response in stub.Observe(pb.ObserveRequest(run_id=run_id)):
                if response.WhichOneof("kind") == "events":
                    events.extend(response.events.events)
                    if until is not None and until(events):
                        return events
    return events


async def run_record(caller: KeelProcess, run_id: str) -> pb.Run:
    async with grpc.aio.insecure_channel(caller.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        return (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run


async def remote_tasks(servers: Servers, key: str = "") -> list[a2a.Task]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(headers=headers) as http:
        client = await create_client(servers.remote_url, ClientConfig(httpx_client=http))
        try:
            listed = await client.list_tasks(a2a.ListTasksRequest(page_size=100))
            return list(listed.tasks)
        finally:
            await client.close()


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def finished_output(events: Sequence[pb.AgentEvent]) -> str:
    assert kinds(events)[-1] == "finish", kinds(events)
    return events[-1].finish.output_text


def assert_gap_free(events: Sequence[pb.AgentEvent]) -> None:
    assert [e.index for e in events] == list(range(len(events)))
    assert kinds(events).count("finish") == 1


async def test_a_remote_agents_progress_and_answer_reach_the_run(servers: Servers) -> None:
    caller = await servers.start_caller(args=["--http-port", "0"])
    run_id = await start_run(
        caller, plan({"tool": "ask_remote", "message": remote_script(20, delay_ms=5)})
    )
    events = await observe(caller, run_id)
    assert_gap_free(events)
    assert finished_output(events) == f"ask_remote: {remote_text(20)}"
    got = outputs(events, "call_0")
    # The remote task's stream, as ToolOutput events: its states, then its text in chunks.
    [task] = await remote_tasks(servers)
    assert {value.get("task_id") for value in got} == {task.id}
    states = [value["state"] for value in got if "state" in value]
    assert states[-1] == "completed"
    assert "working" in states
    assert reassembled(got) == remote_text(20)
    # Every output sits between the call and its result.
    order = kinds(events)
    first, last = order.index("tool_output"), len(order) - 1 - order[::-1].index("tool_output")
    assert order.index("tool_call") < first and last < order.index("tool_result")
    # The remote task is the call's: its message and context ids derive from the call.
    _, context_id = message_ids(run_id, "call_0")
    assert task.context_id == context_id
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    # The caller's own A2A stream carries the same outputs, as `tool_output` data parts
    # of working status messages: progress nests through a chain of agents.
    client = await create_client(f"http://127.0.0.1:{caller.http_port}/a2a/caller")
    try:
        seen = [
            json_format.MessageToDict(part.data)["tool_output"]
            async for response in client.subscribe(a2a.SubscribeToTaskRequest(id=run_id))
            if response.WhichOneof("payload") == "status_update"
            for part in response.status_update.status.message.parts
            if part.WhichOneof("content") == "data"
            and "tool_output" in json_format.MessageToDict(part.data)
        ]
    finally:
        await client.close()
    assert seen == [{"tool_call_id": "call_0", "output": value} for value in got]


async def test_a_sigkill_mid_call_follows_the_same_remote_task(servers: Servers) -> None:
    """The caller's server dies while the remote task runs: the next server resubscribes
    to that task (its note in the journal) instead of sending the message again."""
    first = await servers.start_caller()
    deltas = 40
    run_id = await start_run(
        first, plan({"tool": "ask_remote", "message": remote_script(deltas, delay_ms=100)})
    )

    def remote_text_flows(events: list[pb.AgentEvent]) -> bool:
        return any("text" in value for value in outputs(events, "call_0"))

    before = await observe(first, run_id, until=remote_text_flows)
    first.kill()
    await first.wait()
    [task] = await remote_tasks(servers)
    assert task.status.state == a2a.TASK_STATE_WORKING, "the remote ended before the kill"
    assert await servers.note(run_id, "call_0") == task.id.encode()

    second = await servers.start_caller()
    events = await observe(second, run_id)
    assert_gap_free(events)
    assert events[: len(before)] == before
    assert "step_superseded" in kinds(events)
    assert finished_output(events) == f"ask_remote: {remote_text(deltas)}"
    # The call's attempt on the second server followed the same task to its end.
    kept = outputs(effective(events), "call_0")
    assert {value.get("task_id") for value in kept} == {task.id}
    assert reassembled(kept) == remote_text(deltas)
    # Exactly one remote task for the call: the message was never sent again.
    tasks = await remote_tasks(servers)
    assert [t.id for t in tasks] == [task.id]
    assert tasks[0].status.state == a2a.TASK_STATE_COMPLETED
    assert (await run_record(second, run_id)).state == pb.RUN_STATE_SUCCEEDED


async def test_a_completed_call_is_not_repeated_after_a_sigkill(servers: Servers) -> None:
    """The remote call returned (journaled) while another tool of the same step still ran
    when the caller's server died: the step runs again, the remote call is not made again
    (no output of it in the new attempt), and the remote has one task."""
    first = await servers.start_caller()
    run_id = await start_run(
        first,
        plan(
            {"tool": "ask_remote", "message": remote_script(5)},
            {"tool": "wait", "ms": 5000},
        ),
    )

    def remote_call_returned(events: list[pb.AgentEvent]) -> bool:
        return any(
            e.WhichOneof("payload") == "tool_result" and e.tool_result.tool_call_id == "call_0"
            for e in events
        )

    before = await observe(first, run_id, until=remote_call_returned)
    first.kill()
    await first.wait()
    assert not [
        e
        for e in before
        if e.WhichOneof("payload") == "tool_result" and e.tool_result.tool_call_id == "call_1"
    ], "the other tool ended before the kill"

    second = await servers.start_caller()
    events = await observe(second, run_id)
    assert_gap_free(events)
    superseded = [e for e in events if e.WhichOneof("payload") == "step_superseded"]
    assert superseded, "the step was not re-run"
    after = events[superseded[-1].index :]
    assert outputs(after, "call_0") == [], "the journaled remote call ran again"
    assert finished_output(events) == f"ask_remote: {remote_text(5)}\nwait: waited"
    assert len(await remote_tasks(servers)) == 1


async def test_a_resend_before_the_note_finds_the_same_remote_task(servers: Servers) -> None:
    """The window before the note lands: a call whose first run died before it noted the
    task sends the same message again (same ids), and Keel's A2A server gives it the task
    the first send started."""

    class Forgetful:
        """A call journal that loses its notes (the process died before they landed)."""

        run_id = "run-resend"
        tool_call_id = "call_0"

        def __init__(self) -> None:
            self.outputs: list[dict[str, Any]] = []

        async def noted(self) -> bytes | None:
            return None

        async def note(self, value: bytes) -> None:
            pass

        async def output(self, value: Any) -> None:
            self.outputs.append(value)

    remote = RemoteAgent(servers.remote_url)
    first, second = Forgetful(), Forgetful()
    assert await remote.call(remote_script(10), first) == remote_text(10)
    assert await remote.call(remote_script(10), second) == remote_text(10)
    tasks = await remote_tasks(servers)
    assert len(tasks) == 1
    assert {v.get("task_id") for v in second.outputs if "task_id" in v} == {tasks[0].id}

    class Noted(Forgetful):
        """A call journal holding the task's note: the call follows that task and sends
        nothing (this message would be refused: it is no script)."""

        async def noted(self) -> bytes | None:
            return tasks[0].id.encode()

    third = Noted()
    assert await remote.call("not a script", third) == remote_text(10)
    assert reassembled(third.outputs) == remote_text(10)
    assert len(await remote_tasks(servers)) == 1


async def test_unreachable_and_failing_remotes_are_told_to_the_model(servers: Servers) -> None:
    caller = await servers.start_caller()
    failing = json.dumps({"steps": [{"text": 2}, {"error": "the remote broke"}]})
    run_id = await start_run(
        caller,
        plan(
            {"tool": "ask_nowhere", "message": "hello"},
            {"tool": "ask_remote", "message": failing},
        ),
    )
    events = await observe(caller, run_id)
    assert_gap_free(events)
    errors = {
        e.tool_error.tool_call_id: e.tool_error.message
        for e in events
        if e.WhichOneof("payload") == "tool_error"
    }
    assert "unreachable" in errors["call_0"] or "failed" in errors["call_0"], errors
    assert "127.0.0.1:9" in errors["call_0"]
    assert "ended failed" in errors["call_1"] and "the remote broke" in errors["call_1"]
    lines = finished_output(events).split("\n")
    assert lines[0].startswith("ask_nowhere failed:")
    assert lines[1].startswith("ask_remote failed:") and "the remote broke" in lines[1]
    [task] = await remote_tasks(servers)
    assert task.status.state == a2a.TASK_STATE_FAILED
    # A malformed message: the remote refuses it, and the model is told why.
    run_id = await start_run(caller, plan({"tool": "ask_remote", "message": "not a script"}))
    events = await observe(caller, run_id)
    assert finished_output(events).startswith("ask_remote failed:")
    assert "invalid script" in finished_output(events)


async def test_a_remote_with_api_keys_is_called_with_the_callers_key(
    no_servers: Servers, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    key = add_key(keys, "tenant-a", Role.RUNNER)
    await no_servers.start_remote(env={"KEEL_API_KEYS_FILE": str(keys)})
    with_key = await no_servers.start_caller(env={REMOTE_KEY_ENV: key})
    run_id = await start_run(with_key, plan({"tool": "ask_remote", "message": remote_script(3)}))
    events = await observe(with_key, run_id)
    assert finished_output(events) == f"ask_remote: {remote_text(3)}"
    [task] = await remote_tasks(no_servers, key)
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    # Without the key the remote refuses the message, and the model is told so.
    without = await no_servers.start_caller()
    run_id = await start_run(without, plan({"tool": "ask_remote", "message": remote_script(3)}))
    events = await observe(without, run_id)
    assert finished_output(events).startswith("ask_remote failed:")
    assert "401" in finished_output(events)
    assert len(await remote_tasks(no_servers, key)) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_a_remote_server_that_dies_mid_call_is_looked_for_again(
    no_servers: Servers,
) -> None:
    """The remote's server dies while its task runs and another takes its place (same
    store, same port): the call's stream breaks, it looks for the task again (GetTask,
    SubscribeToTask) and follows it to its end, with no second remote task."""
    port = str(free_port())
    remote_env = {**CALLER_ENV}  # short leases: the next remote server takes the task over
    await no_servers.start_remote(env=remote_env, http_port=port)
    caller = await no_servers.start_caller()
    deltas = 40
    run_id = await start_run(
        caller, plan({"tool": "ask_remote", "message": remote_script(deltas, delay_ms=100)})
    )

    def remote_text_flows(events: list[pb.AgentEvent]) -> bool:
        return any("text" in value for value in outputs(events, "call_0"))

    await observe(caller, run_id, until=remote_text_flows)
    assert no_servers.remote is not None
    no_servers.remote.kill()
    await no_servers.remote.wait()
    await no_servers.start_remote(env=remote_env, http_port=port)
    events = await observe(caller, run_id)
    assert "step_superseded" not in kinds(events)  # the caller's server did not die
    assert finished_output(events) == f"ask_remote: {remote_text(deltas)}"
    assert reassembled(outputs(events, "call_0")) == remote_text(deltas)
    [task] = await remote_tasks(no_servers)
    assert task.status.state == a2a.TASK_STATE_COMPLETED


async def test_under_temporal_a_worker_killed_mid_call_follows_the_same_remote_task(
    servers: Servers, temporal_address: str
) -> None:
    """The caller on the Temporal executor: its worker dies while the remote task runs;
    Temporal retries the tool calls on another worker, which follows the noted task."""
    queue = f"queue-{servers.key_prefix}"
    env = {
        **CALLER_ENV,
        REMOTE_URL_ENV: servers.remote_url,
        "KEEL_EXECUTOR": "temporal",
        "KEEL_TEMPORAL_ADDRESS": temporal_address,
        "KEEL_TASK_QUEUE": queue,
        "KEEL_TEMPORAL_HEARTBEAT_TIMEOUT_S": "2",
    }
    api = await start_keel_process(
        redis_url=servers.redis_url,
        key_prefix=f"{servers.key_prefix}-caller",
        agents="tests.a2a_registry:registry",
        env=env,
    )
    servers.processes.append(api)
    workers: list[WorkerProcess] = []

    def worker() -> WorkerProcess:
        process = start_worker(
            temporal_address=temporal_address,
            redis_url=servers.redis_url,
            key_prefix=f"{servers.key_prefix}-caller",
            task_queue=queue,
            agents="tests.a2a_registry:registry",
            env=env,
        )
        workers.append(process)
        return process

    try:
        first = worker()
        deltas = 40
        run_id = await start_run(
            api, plan({"tool": "ask_remote", "message": remote_script(deltas, delay_ms=100)})
        )

        def remote_text_flows(events: list[pb.AgentEvent]) -> bool:
            return any("text" in value for value in outputs(events, "call_0"))

        await observe(api, run_id, until=remote_text_flows)
        first.kill()
        [task] = await remote_tasks(servers)
        assert task.status.state == a2a.TASK_STATE_WORKING, "the remote ended before the kill"
        worker()
        events = await observe(api, run_id)
        assert_gap_free(events)
        assert "step_superseded" in kinds(events)
        assert finished_output(events) == f"ask_remote: {remote_text(deltas)}"
        kept = outputs(effective(events), "call_0")
        assert {value.get("task_id") for value in kept} == {task.id}
        assert reassembled(kept) == remote_text(deltas)
        assert [t.id for t in await remote_tasks(servers)] == [task.id]
    finally:
        for process in workers:
            process.kill()
