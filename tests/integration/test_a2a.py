"""A2A (docs/a2a.md) with the a2a-sdk's client as the caller: JSON-RPC on the HTTP port and
gRPC on the gRPC port, against a real server on each backend."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.client import Client, ClientCallContext
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from google.protobuf import json_format
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel

from server.agents.types import AgentSpec
from server.app import Keel
from server.auth.keys import Role, add_key
from tests.integration.conftest import script, text
from tests.processes import start_keel_process
from tests.registries import options

SCRIPTED_TEXT = "".join(f"t{n} " for n in range(50)) + "done"  # its final answer
NEXT_OFFSET = "keel.dev/next_offset"
VERSION = {"a2a-version": "1.0"}  # what the SDK's clients send; without it: A2A 0.3


class Forecast(BaseModel):
    city: str
    celsius: int


# The scripted agents, and one with structured output.
AGENTS = {
    **options,
    "forecast": AgentSpec(
        agent=Agent(
            TestModel(custom_output_args={"city": "Oslo", "celsius": 3}), output_type=Forecast
        )
    ),
}


async def web_keel(start_keel: Callable[..., Any], **overrides: Any) -> Keel:
    keel: Keel = await start_keel(http_port=0, **overrides)
    return keel


def agent_url(keel: Keel, agent_id: str = "scripted") -> str:
    assert keel.http is not None
    return f"http://127.0.0.1:{keel.http.port}/a2a/{agent_id}"


def user_message(text_: str, **fields: Any) -> a2a.Message:
    return a2a.Message(
        message_id=str(uuid.uuid4()), role=a2a.ROLE_USER, parts=[a2a.Part(text=text_)], **fields
    )


def decisions_message(task_id: str, decisions: list[dict[str, Any]]) -> a2a.Message:
    part = a2a.Part()
    json_format.ParseDict({"decisions": decisions}, part.data)
    return a2a.Message(
        message_id=str(uuid.uuid4()), role=a2a.ROLE_USER, task_id=task_id, parts=[part]
    )


async def client_of(keel: Keel, transport: str = "jsonrpc", key: str = "") -> Client:
    if transport == "grpc":

        def channel(target: str) -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(target)

        config = ClientConfig(
            grpc_channel_factory=channel,
            supported_protocol_bindings=["GRPC"],
        )
        return await create_client(agent_url(keel), client_config=config)
    if transport == "rest":
        config = ClientConfig(supported_protocol_bindings=["HTTP+JSON"])
        return await create_client(agent_url(keel), client_config=config)
    if key:
        config = ClientConfig(
            httpx_client=httpx.AsyncClient(headers={"authorization": f"Bearer {key}"})
        )
        return await create_client(agent_url(keel), client_config=config)
    return await create_client(agent_url(keel))


class Reassembled:
    """A task's stream as a client sees it: the text artifact rebuilt from its chunks."""

    def __init__(self) -> None:
        self.text = ""
        self.states: list[int] = []
        self.task_id = ""
        self.next_offset = 0
        self.last_chunk = False
        self.status_messages: list[a2a.Message] = []
        self.data_artifacts: list[a2a.Artifact] = []

    def add(self, response: a2a.StreamResponse) -> None:
        kind = response.WhichOneof("payload")
        if kind == "task":
            self.task_id = response.task.id
            return
        event: Any = getattr(response, kind)
        if NEXT_OFFSET in event.metadata:
            self.next_offset = int(event.metadata[NEXT_OFFSET])
        if kind == "status_update":
            self.states.append(event.status.state)
            if event.status.HasField("message"):
                self.status_messages.append(event.status.message)
        elif kind == "artifact_update":
            if event.artifact.artifact_id == "text":
                chunk = "".join(p.text for p in event.artifact.parts)
                self.text = self.text + chunk if event.append else chunk
                self.last_chunk = event.last_chunk
            else:
                self.data_artifacts.append(event.artifact)


async def consume(
    stream: AsyncIterator[a2a.StreamResponse], into: Reassembled, stop_after: int | None = None
) -> Reassembled:
    seen = 0
    async for response in stream:
        into.add(response)
        seen += 1
        if stop_after is not None and seen >= stop_after:
            break
    return into


@pytest.mark.parametrize("transport", ["jsonrpc", "grpc", "rest"])
async def test_a_streamed_run_is_one_text_artifact(
    start_keel: Callable[..., Any], transport: str
) -> None:
    keel = await web_keel(start_keel)
    client = await client_of(keel, transport)
    got = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(script(text(50))))),
        Reassembled(),
    )
    assert got.text == SCRIPTED_TEXT
    assert got.last_chunk
    assert got.states[0] == a2a.TASK_STATE_WORKING
    assert got.states[-1] == a2a.TASK_STATE_COMPLETED
    task = await client.get_task(a2a.GetTaskRequest(id=got.task_id))
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    assert task.artifacts[0].parts[0].text == SCRIPTED_TEXT
    assert task.context_id  # a thread of its own
    await client.close()


async def test_subscribing_from_the_offset_misses_and_repeats_nothing(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel)
    client = await client_of(keel)
    request = a2a.SendMessageRequest(message=user_message(script(text(50, delay_ms=20))))
    first = await consume(client.send_message(request), Reassembled(), stop_after=10)
    assert first.task_id and 0 < len(first.text) < len(SCRIPTED_TEXT)
    context = ClientCallContext(service_parameters={"keel-next-offset": str(first.next_offset)})
    rest = Reassembled()
    rest.text = first.text  # the client keeps what it had
    await consume(
        client.subscribe(a2a.SubscribeToTaskRequest(id=first.task_id), context=context), rest
    )
    assert rest.text == SCRIPTED_TEXT
    assert rest.states[-1] == a2a.TASK_STATE_COMPLETED
    await client.close()


async def test_cancel_task(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    client = await client_of(keel)
    request = a2a.SendMessageRequest(
        message=user_message(script(text(50, delay_ms=100))),
        configuration=a2a.SendMessageConfiguration(return_immediately=True),
    )
    got = await consume(client.send_message(request), Reassembled(), stop_after=2)
    cancelled = await client.cancel_task(a2a.CancelTaskRequest(id=got.task_id))
    assert cancelled.id == got.task_id
    task = await client.get_task(a2a.GetTaskRequest(id=got.task_id))
    for _ in range(200):  # the run's owner aborts it soon after
        if task.status.state == a2a.TASK_STATE_CANCELED:
            break
        await asyncio.sleep(0.05)
        task = await client.get_task(a2a.GetTaskRequest(id=got.task_id))
    assert task.status.state == a2a.TASK_STATE_CANCELED
    with pytest.raises(Exception, match="cannot be canceled"):
        await client.cancel_task(a2a.CancelTaskRequest(id=got.task_id))
    await client.close()


@pytest.mark.parametrize("transport", ["jsonrpc", "grpc", "rest"])
async def test_approval_round_trip(start_keel: Callable[..., Any], transport: str) -> None:
    keel = await web_keel(start_keel)
    client = await client_of(keel, transport)
    steps = script(text(3), {"tool": "approve_me", "args": {"action": "deploy"}}, text(3))
    got = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(steps))), Reassembled()
    )
    assert got.states[-1] == a2a.TASK_STATE_INPUT_REQUIRED
    asked = got.status_messages[-1]
    pending = json_format.MessageToDict(asked.parts[1].data)["pending"]
    assert [(p["tool_name"], p["kind"], p["args"]) for p in pending] == [
        ("approve_me", "approval", {"action": "deploy"})
    ]
    # Text alone does not answer it.
    with pytest.raises(Exception, match="input-required"):
        await consume(
            client.send_message(
                a2a.SendMessageRequest(message=user_message("yes", task_id=got.task_id))
            ),
            Reassembled(),
        )
    answer = decisions_message(
        got.task_id, [{"tool_call_id": pending[0]["tool_call_id"], "approve": True}]
    )
    resumed = Reassembled()
    resumed.text = got.text
    await consume(client.send_message(a2a.SendMessageRequest(message=answer)), resumed)
    assert resumed.states[-1] == a2a.TASK_STATE_COMPLETED
    assert resumed.text == "t0 t1 t2 t3 t4 t5 done"
    # A finished task takes no more messages.
    with pytest.raises(Exception, match="no more messages"):
        await consume(client.send_message(a2a.SendMessageRequest(message=answer)), Reassembled())
    await client.close()


async def test_cards(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel, http_cors_origins="https://agents.test")
    assert keel.http is not None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{keel.http.port}") as http:
        card = (await http.get("/a2a/scripted/.well-known/agent-card.json")).json()
        assert card["name"] == "scripted"
        assert card["capabilities"]["streaming"] is True
        assert card["capabilities"]["pushNotifications"] is True
        assert {s["id"] for s in card["skills"]} >= {"approve_me"}
        interfaces = {i["protocolBinding"]: i for i in card["supportedInterfaces"]}
        assert interfaces["JSONRPC"]["url"].endswith("/a2a/scripted")
        assert interfaces["GRPC"]["tenant"] == "scripted"
        assert interfaces["HTTP+JSON"]["url"].endswith("/a2a/scripted/rest")
        preflight = await http.options(
            "/a2a/scripted",
            headers={
                "origin": "https://agents.test",
                "access-control-request-method": "POST",
                "access-control-request-headers": "a2a-version, keel-next-offset",
            },
        )
        assert preflight.status_code == 204
        allowed = preflight.headers["access-control-allow-headers"]
        assert "a2a-version" in allowed and "keel-next-offset" in allowed
        default = (await http.get("/.well-known/agent-card.json")).json()
        assert default["supportedInterfaces"]
        assert (await http.get("/a2a/nobody/.well-known/agent-card.json")).status_code == 404
        # The port's own errors, as JSON.
        for method, path, code in (
            ("GET", "/a2a", 404),
            ("GET", "/a2a/scripted", 405),
            ("POST", "/.well-known/agent-card.json", 405),
            ("GET", "/a2a/scripted/rest/nothing", 404),
        ):
            response = await http.request(method, path)
            assert response.status_code == code, path
            assert response.json()["code"] in ("not_found", "unimplemented"), path


async def test_bad_json_rpc(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    url = agent_url(keel)
    async with httpx.AsyncClient() as http:

        async def code(body: bytes) -> int:
            response = await http.post(
                url, content=body, headers={"content-type": "application/json", **VERSION}
            )
            return int(response.json()["error"]["code"])

        assert await code(b"{not json") == -32700
        assert await code(b'{"jsonrpc": "1.0", "id": 1, "method": "GetTask"}') == -32600
        assert await code(b'{"jsonrpc": "2.0", "id": 1, "method": "Nope", "params": {}}') == -32601
        assert (
            await code(
                b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", '
                b'"params": {"id": 5, "historyLength": "x"}}'
            )
            == -32602
        )
        unknown = b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "%s"}}'
        assert await code(unknown % str(uuid.uuid4()).encode()) == -32001  # TaskNotFound
        assert await code(unknown % b"not a run id") == -32001


async def test_oversized_requests_are_refused(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel, grpc_max_receive_message_bytes=64 * 1024)
    async with httpx.AsyncClient() as http:
        response = await http.post(
            agent_url(keel),
            content=b'{"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"x": "'
            + b"x" * 100_000
            + b'"}}',
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == -32600


async def test_auth(start_keel: Callable[..., Any], tmp_path: Path) -> None:
    keys = tmp_path / "keys.jsonl"
    runner = add_key(keys, "tenant-a", Role.RUNNER)
    reader = add_key(keys, "tenant-a", Role.READER)
    other = add_key(keys, "tenant-b", Role.RUNNER)
    keel = await web_keel(start_keel, api_keys_file=str(keys))
    async with httpx.AsyncClient() as http:
        body = b'{"jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": {}}'
        assert (await http.post(agent_url(keel), content=body)).status_code == 401
        card = (await http.get(agent_url(keel) + "/.well-known/agent-card.json")).json()
        assert "bearer" in card["securitySchemes"]
    client = await client_of(keel, key=runner)
    got = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(script(text(5))))),
        Reassembled(),
    )
    assert got.text == "t0 t1 t2 t3 t4 done"
    reading = await client_of(keel, key=reader)
    assert (await reading.get_task(a2a.GetTaskRequest(id=got.task_id))).id == got.task_id
    with pytest.raises(Exception, match="403"):
        await consume(
            reading.send_message(a2a.SendMessageRequest(message=user_message(script(text(1))))),
            Reassembled(),
        )
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {reader}", **VERSION}) as http:
        cancel = {"jsonrpc": "2.0", "id": 1, "method": "CancelTask", "params": {"id": "x"}}
        refused = await http.post(agent_url(keel), json=cancel)
        assert refused.status_code == 403
        assert "runner" in refused.json()["message"]
        assert (await http.post(agent_url(keel) + "/rest/message:send", json={})).status_code == 403
        listed = await http.get(agent_url(keel) + "/rest/tasks")
        assert listed.status_code == 200
        assert [t["id"] for t in listed.json()["tasks"]] == [got.task_id]
    async with httpx.AsyncClient() as http:
        assert (await http.get(agent_url(keel) + "/rest/tasks")).status_code == 401
    foreign = await client_of(keel, key=other)
    with pytest.raises(Exception, match="not found"):
        await foreign.get_task(a2a.GetTaskRequest(id=got.task_id))
    listed = await foreign.list_tasks(a2a.ListTasksRequest())
    assert not listed.tasks
    for c in (client, reading, foreign):
        await c.close()


async def test_a_follow_up_message_in_the_context_shares_its_history(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel)
    client = await client_of(keel)
    echo = script({"echo_history": True})
    first = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(echo))), Reassembled()
    )
    assert first.text == "history=0 done"
    task = await client.get_task(a2a.GetTaskRequest(id=first.task_id, history_length=1))
    assert len(task.history) == 1
    context_id = task.context_id
    second = await consume(
        client.send_message(
            a2a.SendMessageRequest(message=user_message(echo, context_id=context_id))
        ),
        Reassembled(),
    )
    assert second.text == "history=1 done"
    # A context of the caller's choosing is made on first use.
    mine = str(uuid.uuid4()).replace("-", "")
    third = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(echo, context_id=mine))),
        Reassembled(),
    )
    assert third.text == "history=0 done"
    # A context takes one task at a time.
    slow = user_message(script(text(50, delay_ms=50)), context_id=mine)
    await consume(
        client.send_message(a2a.SendMessageRequest(message=slow)), Reassembled(), stop_after=3
    )
    with pytest.raises(Exception, match="is busy with task"):
        await consume(
            client.send_message(
                a2a.SendMessageRequest(message=user_message(echo, context_id=mine))
            ),
            Reassembled(),
        )
    listed = await client.list_tasks(a2a.ListTasksRequest(context_id=context_id))
    assert {t.id for t in listed.tasks} == {first.task_id, second.task_id}
    assert all(not t.artifacts for t in listed.tasks)
    everything = await client.list_tasks(a2a.ListTasksRequest(page_size=2, include_artifacts=True))
    assert len(everything.tasks) == 2 and everything.next_page_token
    assert everything.tasks[0].artifacts
    rest = await client.list_tasks(
        a2a.ListTasksRequest(page_size=2, page_token=everything.next_page_token)
    )
    assert len(rest.tasks) == 2
    completed = await client.list_tasks(a2a.ListTasksRequest(status=a2a.TASK_STATE_COMPLETED))
    assert len(completed.tasks) == 3  # (the slow one is still working)
    later = a2a.ListTasksRequest()
    later.status_timestamp_after.FromMilliseconds(
        task.status.timestamp.ToMilliseconds() + 3_600_000
    )
    assert not (await client.list_tasks(later)).tasks
    await client.close()


async def test_send_message_without_streaming_waits_unless_told_not_to(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel)
    client = await create_client(agent_url(keel), client_config=ClientConfig(streaming=False))
    responses = [
        r
        async for r in client.send_message(
            a2a.SendMessageRequest(message=user_message(script(text(5))))
        )
    ]
    assert responses[-1].task.status.state == a2a.TASK_STATE_COMPLETED
    assert responses[-1].task.artifacts[0].parts[0].text == "t0 t1 t2 t3 t4 done"
    at_once = [
        r
        async for r in client.send_message(
            a2a.SendMessageRequest(
                message=user_message(script(text(5, delay_ms=50))),
                configuration=a2a.SendMessageConfiguration(return_immediately=True),
            )
        )
    ]
    assert at_once[-1].task.status.state in (a2a.TASK_STATE_SUBMITTED, a2a.TASK_STATE_WORKING)
    await client.close()


async def test_grpc_subscribe_from_the_offset_and_errors(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    client = await client_of(keel, "grpc")
    request = a2a.SendMessageRequest(message=user_message(script(text(50, delay_ms=20))))
    first = await consume(client.send_message(request), Reassembled(), stop_after=10)
    context = ClientCallContext(service_parameters={"keel-next-offset": str(first.next_offset)})
    rest = Reassembled()
    rest.text = first.text
    await consume(
        client.subscribe(a2a.SubscribeToTaskRequest(id=first.task_id), context=context), rest
    )
    assert rest.text == SCRIPTED_TEXT
    with pytest.raises(Exception, match="not found"):
        await client.get_task(a2a.GetTaskRequest(id=str(uuid.uuid4())))
    with pytest.raises(Exception, match="cannot be canceled"):
        await client.cancel_task(a2a.CancelTaskRequest(id=first.task_id))
    await client.close()
    # The request's tenant names the agent: an unknown one is refused.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = a2a_pb2_grpc.A2AServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.SendMessage(
                a2a.SendMessageRequest(tenant="nobody", message=user_message("hi")),
                metadata=(("a2a-version", "1.0"),),
            )
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpc_auth(start_keel: Callable[..., Any], tmp_path: Path) -> None:
    keys = tmp_path / "keys.jsonl"
    reader = add_key(keys, "tenant-a", Role.READER)
    keel = await web_keel(start_keel, api_keys_file=str(keys))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = a2a_pb2_grpc.A2AServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.ListTasks(a2a.ListTasksRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {reader}"), ("a2a-version", "1.0"))
        assert not (await stub.ListTasks(a2a.ListTasksRequest(), metadata=metadata)).tasks
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.SendMessage(
                a2a.SendMessageRequest(message=user_message(script(text(1)))),
                metadata=metadata,
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_approval_survives_a_sigkill(redis_url: str, key_prefix: str) -> None:
    env = {"KEEL_LEASE_TTL_S": "1"}
    first = await start_keel_process(
        redis_url=redis_url, key_prefix=key_prefix, args=["--http-port", "0"], env=env
    )
    try:
        client = await create_client(f"http://127.0.0.1:{first.http_port}/a2a/scripted")
        steps = script(text(3), {"tool": "approve_me", "args": {"action": "deploy"}}, text(3))
        got = await consume(
            client.send_message(a2a.SendMessageRequest(message=user_message(steps))),
            Reassembled(),
        )
        await client.close()
        assert got.states[-1] == a2a.TASK_STATE_INPUT_REQUIRED
    finally:
        first.kill()
        await first.wait()
    second = await start_keel_process(
        redis_url=redis_url, key_prefix=key_prefix, args=["--http-port", "0"], env=env
    )
    try:
        client = await create_client(f"http://127.0.0.1:{second.http_port}/a2a/scripted")
        task = await client.get_task(a2a.GetTaskRequest(id=got.task_id))
        assert task.status.state == a2a.TASK_STATE_INPUT_REQUIRED
        pending = json_format.MessageToDict(task.status.message.parts[1].data)["pending"]
        answer = decisions_message(
            got.task_id, [{"tool_call_id": pending[0]["tool_call_id"], "approve": True}]
        )
        resumed = Reassembled()
        resumed.text = got.text
        await consume(client.send_message(a2a.SendMessageRequest(message=answer)), resumed)
        assert resumed.states[-1] == a2a.TASK_STATE_COMPLETED
        assert resumed.text == "t0 t1 t2 t3 t4 t5 done"
        results = [
            json_format.MessageToDict(m.parts[1].data)
            for m in resumed.status_messages
            if len(m.parts) > 1
        ]
        assert any("tool_result" in r for r in results)
        await client.close()
    finally:
        second.kill()
        await second.wait()


async def test_a_stream_resumes_on_another_server_after_a_sigkill(
    redis_url: str, key_prefix: str
) -> None:
    env = {"KEEL_LEASE_TTL_S": "1"}
    first = await start_keel_process(
        redis_url=redis_url, key_prefix=key_prefix, args=["--http-port", "0"], env=env
    )
    try:
        client = await create_client(f"http://127.0.0.1:{first.http_port}/a2a/scripted")
        request = a2a.SendMessageRequest(message=user_message(script(text(50, delay_ms=20))))
        got = await consume(client.send_message(request), Reassembled(), stop_after=10)
        await client.close()
        assert 0 < len(got.text) < len(SCRIPTED_TEXT)
    finally:
        first.kill()
        await first.wait()
    second = await start_keel_process(
        redis_url=redis_url, key_prefix=key_prefix, args=["--http-port", "0"], env=env
    )
    try:
        client = await create_client(f"http://127.0.0.1:{second.http_port}/a2a/scripted")
        context = ClientCallContext(service_parameters={"keel-next-offset": str(got.next_offset)})
        # The interrupted attempt's text is taken back (a chunk with append false) and
        # the step runs again on this server.
        await consume(
            client.subscribe(a2a.SubscribeToTaskRequest(id=got.task_id), context=context), got
        )
        assert got.text == SCRIPTED_TEXT
        assert got.states[-1] == a2a.TASK_STATE_COMPLETED
        task = await client.get_task(a2a.GetTaskRequest(id=got.task_id))
        assert task.artifacts[0].parts[0].text == SCRIPTED_TEXT
        await client.close()
    finally:
        second.kill()
        await second.wait()


async def test_decisions_and_messages_that_do_not_fit(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    client = await client_of(keel)
    steps = script({"tool": "approve_me", "args": {"action": "deploy"}}, text(2))
    got = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(steps))), Reassembled()
    )
    pending = json_format.MessageToDict(got.status_messages[-1].parts[1].data)["pending"]
    call_id = pending[0]["tool_call_id"]

    async def send(decisions: list[dict[str, Any]]) -> Reassembled:
        message = decisions_message(got.task_id, decisions)
        return await consume(
            client.send_message(a2a.SendMessageRequest(message=message)), Reassembled()
        )

    with pytest.raises(Exception, match="approve, deny or result"):
        await send([{"tool_call_id": call_id}])
    with pytest.raises(Exception, match="names no pending interrupt"):
        await send([{"tool_call_id": "nobody", "approve": True}])
    elsewhere = decisions_message(got.task_id, [{"tool_call_id": call_id, "approve": True}])
    elsewhere.context_id = "another-context"
    with pytest.raises(Exception, match="is in context"):
        await consume(client.send_message(a2a.SendMessageRequest(message=elsewhere)), Reassembled())
    denied = await send([{"tool_call_id": call_id, "deny": "not today"}])
    assert denied.states[-1] == a2a.TASK_STATE_COMPLETED
    results = [
        json_format.MessageToDict(m.parts[1].data)["tool_result"]
        for m in denied.status_messages
        if len(m.parts) > 1 and "tool_result" in json_format.MessageToDict(m.parts[1].data)
    ]
    assert results[0]["denied"] is True
    # Subscribing without an offset replays the task from its first event; at its end,
    # there is nothing to subscribe to.
    again = await consume(
        client.subscribe(a2a.SubscribeToTaskRequest(id=got.task_id)), Reassembled()
    )
    assert again.text == "t0 t1 done"
    assert again.states[-1] == a2a.TASK_STATE_COMPLETED
    # ... its past suspension too, with the calls it waited for then.
    assert a2a.TASK_STATE_INPUT_REQUIRED in again.states
    asked_then = [m for m in again.status_messages if m.parts[0].text.startswith("waiting")]
    assert json_format.MessageToDict(asked_then[0].parts[1].data)["pending"] == pending
    at_end = ClientCallContext(service_parameters={"keel-next-offset": str(again.next_offset)})
    with pytest.raises(Exception, match="nothing to subscribe to"):
        await consume(
            client.subscribe(a2a.SubscribeToTaskRequest(id=got.task_id), context=at_end),
            Reassembled(),
        )
    # A message for a working task.
    slow = await consume(
        client.send_message(
            a2a.SendMessageRequest(message=user_message(script(text(50, delay_ms=50))))
        ),
        Reassembled(),
        stop_after=3,
    )
    with pytest.raises(Exception, match="only when input-required"):
        await send_to(client, slow.task_id)
    replayed = await consume(
        client.subscribe(a2a.SubscribeToTaskRequest(id=slow.task_id)), Reassembled()
    )
    assert replayed.text == SCRIPTED_TEXT
    await client.close()


async def send_to(client: Client, task_id: str) -> None:
    message = decisions_message(task_id, [{"tool_call_id": "x", "approve": True}])
    await consume(client.send_message(a2a.SendMessageRequest(message=message)), Reassembled())


async def test_grpc_oversized_messages_are_refused(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel, grpc_max_receive_message_bytes=64 * 1024)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = a2a_pb2_grpc.A2AServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SendMessage(
                a2a.SendMessageRequest(message=user_message("x" * 100_000)),
                metadata=(("a2a-version", "1.0"),),
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_structured_output_live_only_agents_and_the_default_card(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(
        start_keel, agents="tests.integration.test_a2a:AGENTS", a2a_default_agent="scripted-live"
    )
    judge = await client_of_agent(keel, "forecast")
    got = await consume(
        judge.send_message(a2a.SendMessageRequest(message=user_message("judge this"))),
        Reassembled(),
    )
    assert got.states[-1] == a2a.TASK_STATE_COMPLETED, got.status_messages
    [output] = got.data_artifacts
    assert output.artifact_id == "output"
    assert json_format.MessageToDict(output.parts[0].data) == {"city": "Oslo", "celsius": 3}
    task = await judge.get_task(a2a.GetTaskRequest(id=got.task_id))
    assert [a.artifact_id for a in task.artifacts] == ["output"]
    await judge.close()
    # A live-only agent's events are not kept: its task has no artifacts to show.
    live = await client_of_agent(keel, "scripted-live")
    streamed = await consume(
        live.send_message(a2a.SendMessageRequest(message=user_message(script(text(3))))),
        Reassembled(),
    )
    assert streamed.text == "t0 t1 t2 done"
    task = await live.get_task(a2a.GetTaskRequest(id=streamed.task_id))
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    assert not task.artifacts
    await live.close()
    assert keel.http is not None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{keel.http.port}") as http:
        assert (await http.get("/.well-known/agent-card.json")).json()["name"] == "scripted-live"


async def client_of_agent(keel: Keel, agent_id: str) -> Client:
    return await create_client(agent_url(keel, agent_id))


METHODS = (
    "SendMessage",
    "SendStreamingMessage",
    "GetTask",
    "ListTasks",
    "CancelTask",
    "SubscribeToTask",
    "CreateTaskPushNotificationConfig",
    "GetTaskPushNotificationConfig",
    "ListTaskPushNotificationConfigs",
    "DeleteTaskPushNotificationConfig",
    "GetExtendedAgentCard",
)
ODD_VALUES: tuple[Any, ...] = (
    None,
    0,
    -1,
    2**70,
    1.5,
    "",
    "x" * 1000,
    "\u0000",
    [],
    {},
    [[[[[[[[[[]]]]]]]]]],
    True,
)


async def test_odd_requests_never_get_a_server_error(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    url = agent_url(keel)
    bodies: list[bytes] = [b"", b"\xff\xfe", b"[]", b"null", b'"x"', b"[" * 5000 + b"]" * 5000]
    for method in METHODS:
        for value in ODD_VALUES:
            for params in (
                value,
                {"id": value},
                {"message": value},
                {"message": {"parts": value, "taskId": value}},
                {"message": {"parts": [{"text": "hi"}], "taskId": value, "contextId": value}},
                {"message": {"parts": [{"data": value}], "taskId": "a:b"}},
                {"pageSize": value, "status": value, "pageToken": value},
                {"historyLength": value, "id": "x"},
            ):
                bodies.append(
                    json.dumps(
                        {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
                    ).encode()
                )
    async with httpx.AsyncClient(headers={"content-type": "application/json", **VERSION}) as http:
        for body in bodies:
            response = await http.post(url, content=body, timeout=30)
            assert response.status_code < 500, body[:300]
            if response.headers.get("content-type", "").startswith("application/json"):
                answer = response.json()
                if "error" in answer:
                    assert answer["error"]["code"] != -32603, (body[:300], answer)
        rest_bodies = bodies[:6] + [
            json.dumps(shape).encode()
            for value in ODD_VALUES
            for shape in (
                value,
                {"message": value},
                {"message": {"parts": value, "messageId": value}},
                {"message": {"parts": [{"text": "hi"}], "taskId": value, "role": value}},
                {"message": {"parts": [{"data": value}], "taskId": "a:b"}},
                {"configuration": value, "message": {"parts": [{"text": "hi"}]}},
            )
        ]
        for route in ("message:send", "message:stream", "tasks/x:cancel", "tasks/a:b:subscribe"):
            for body in rest_bodies:
                response = await http.post(f"{url}/rest/{route}", content=body, timeout=30)
                assert response.status_code < 500, (route, body[:300])
        for query in ("pageSize=x", "pageSize=-1", "status=7", "historyLength=x", "pageToken=%ff"):
            response = await http.get(f"{url}/rest/tasks?{query}", timeout=30)
            assert response.status_code < 500, query
        for task in ("x", "a:b", "%00", "a" * 3000):
            response = await http.get(f"{url}/rest/tasks/{task}?historyLength=-5", timeout=30)
            assert response.status_code < 500, task


async def test_odd_grpc_requests_get_no_internal_error(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    metadata = (("a2a-version", "1.0"),)
    data = a2a.Part()
    data.data.string_value = "x"
    calls: list[tuple[str, Any]] = [
        ("SendMessage", a2a.SendMessageRequest()),
        ("SendMessage", a2a.SendMessageRequest(message=a2a.Message())),
        ("SendMessage", a2a.SendMessageRequest(message=a2a.Message(message_id="m", parts=[data]))),
        (
            "SendMessage",
            a2a.SendMessageRequest(
                message=a2a.Message(message_id="m", task_id="a:b", parts=[data])
            ),
        ),
        (
            "SendMessage",
            a2a.SendMessageRequest(
                message=a2a.Message(
                    message_id="m", context_id="bad id!", parts=[a2a.Part(text="x")]
                )
            ),
        ),
        ("GetTask", a2a.GetTaskRequest()),
        ("GetTask", a2a.GetTaskRequest(id="a:b", history_length=-3)),
        ("ListTasks", a2a.ListTasksRequest(page_size=-1)),
        ("ListTasks", a2a.ListTasksRequest(page_size=1000)),
        ("ListTasks", a2a.ListTasksRequest(status=99)),  # type: ignore[arg-type]
        ("ListTasks", a2a.ListTasksRequest(page_token="garbage")),
        ("ListTasks", a2a.ListTasksRequest(context_id="bad id!")),
        ("CancelTask", a2a.CancelTaskRequest(id="")),
        ("CancelTask", a2a.CancelTaskRequest(id="x" * 5000)),
        ("GetTaskPushNotificationConfig", a2a.GetTaskPushNotificationConfigRequest(task_id="x")),
        ("GetExtendedAgentCard", a2a.GetExtendedAgentCardRequest()),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = a2a_pb2_grpc.A2AServiceStub(channel)
        for name, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await getattr(stub, name)(request, metadata=metadata)
            assert refused.value.code() not in (
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
            ), (name, request, refused.value.details())
        for request in (
            a2a.SubscribeToTaskRequest(id="a:b"),
            a2a.SubscribeToTaskRequest(),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.SubscribeToTask(request, metadata=metadata):
                    pass
            assert refused.value.code() not in (
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
            ), (request, refused.value.details())
        offset = (*metadata, ("keel-next-offset", "minus one"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.SubscribeToTask(
                a2a.SubscribeToTaskRequest(id="a:b"), metadata=offset
            ):
                pass
        assert refused.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
