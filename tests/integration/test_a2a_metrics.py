"""A2A calls in the RPC metrics (server/a2a/metered.py), scraped from a real server's
/metrics: over JSON-RPC and HTTP+JSON on the HTTP port and A2AService on the gRPC
port, with the a2a-sdk's client, and the calls the SDK refuses before Keel's handler.

The server runs in this process, whose metrics other tests count in too: each test
compares the samples before and after its calls."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.client import Client
from a2a.types import a2a_pb2 as a2a
from prometheus_client.parser import text_string_to_metric_families

from server.a2a import metered
from server.app import Keel
from tests.integration.conftest import script, text
from tests.integration.test_a2a import (
    SCRIPTED_TEXT,
    VERSION,
    Reassembled,
    agent_url,
    consume,
    user_message,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
COUNT = "keel_rpc_duration_seconds_count"
OPEN = "keel_streams_open"


async def scrape(keel: Keel) -> Samples:
    """Every sample at the server's /metrics, by name and labels."""
    assert keel.metrics_server is not None
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{keel.metrics_server.port}/metrics")
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def calls(before: Samples, after: Samples, method: str, code: str) -> float:
    """How many `method` calls ended with `code` between the two scrapes."""
    return value(after, COUNT, method=method, code=code) - value(
        before, COUNT, method=method, code=code
    )


async def metered_keel(start_keel: Callable[..., Any]) -> Keel:
    keel: Keel = await start_keel(http_port=0, metrics_port=0)
    return keel


async def client_of(keel: Keel, transport: str, *, streaming: bool = True) -> Client:
    bindings = {"jsonrpc": "JSONRPC", "rest": "HTTP+JSON", "grpc": "GRPC"}

    def channel(target: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(target)

    config = ClientConfig(
        streaming=streaming,
        supported_protocol_bindings=[bindings[transport]],
        grpc_channel_factory=channel,
    )
    return await create_client(agent_url(keel), client_config=config)


@pytest.mark.parametrize("transport", ["jsonrpc", "rest", "grpc"])
async def test_each_operation_is_counted_with_its_code(
    start_keel: Callable[..., Any], transport: str
) -> None:
    keel = await metered_keel(start_keel)
    streaming = await client_of(keel, transport)
    unary = await client_of(keel, transport, streaming=False)
    before = await scrape(keel)

    got = await consume(
        streaming.send_message(a2a.SendMessageRequest(message=user_message(script(text(50))))),
        Reassembled(),
    )
    assert got.text == SCRIPTED_TEXT
    sent = [
        r
        async for r in unary.send_message(
            a2a.SendMessageRequest(message=user_message(script(text(3))))
        )
    ]
    assert sent[0].task.status.state == a2a.TASK_STATE_COMPLETED
    task = await streaming.get_task(a2a.GetTaskRequest(id=got.task_id))
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    with pytest.raises(Exception, match="not found"):
        await streaming.get_task(a2a.GetTaskRequest(id=str(uuid.uuid4())))
    with pytest.raises(Exception, match="cannot be canceled"):
        await streaming.cancel_task(a2a.CancelTaskRequest(id=got.task_id))
    listed = await streaming.list_tasks(a2a.ListTasksRequest())
    assert got.task_id in [t.id for t in listed.tasks]
    await streaming.close()
    await unary.close()

    after = await scrape(keel)
    assert calls(before, after, "a2a.SendStreamingMessage", "OK") == 1
    assert calls(before, after, "a2a.SendMessage", "OK") == 1
    assert calls(before, after, "a2a.GetTask", "OK") == 1
    assert calls(before, after, "a2a.GetTask", "NOT_FOUND") == 1  # TaskNotFound
    assert calls(before, after, "a2a.CancelTask", "FAILED_PRECONDITION") == 1  # not cancelable
    assert calls(before, after, "a2a.ListTasks", "OK") == 1
    assert value(after, OPEN, rpc="a2a.SendStreamingMessage") == value(
        before, OPEN, rpc="a2a.SendStreamingMessage"
    )
    # A2A's calls are not AgentService's.
    for method in ("StartRun", "Stream", "GetRun", "CancelRun"):
        assert sum(calls(before, after, method, code) for code in ("OK", "NOT_FOUND")) == 0


@pytest.mark.parametrize("transport", ["jsonrpc", "grpc"])
async def test_an_open_stream_counts_until_the_client_goes(
    start_keel: Callable[..., Any], transport: str
) -> None:
    keel = await metered_keel(start_keel)
    client = await client_of(keel, transport)
    before = await scrape(keel)
    rpc = "a2a.SendStreamingMessage"

    stream = client.send_message(
        a2a.SendMessageRequest(message=user_message(script(text(50, delay_ms=100))))
    )
    got = await consume(stream, Reassembled(), stop_after=3)
    during = await scrape(keel)
    assert value(during, OPEN, rpc=rpc) == value(before, OPEN, rpc=rpc) + 1
    subscribed = client.subscribe(a2a.SubscribeToTaskRequest(id=got.task_id))
    await consume(subscribed, Reassembled(), stop_after=1)
    both = await scrape(keel)
    assert (
        value(both, OPEN, rpc="a2a.SubscribeToTask")
        == value(before, OPEN, rpc="a2a.SubscribeToTask") + 1
    )
    await client.close()  # the streams go with it

    after = before
    for _ in range(200):
        after = await scrape(keel)
        if value(after, OPEN, rpc=rpc) == value(before, OPEN, rpc=rpc) and value(
            after, OPEN, rpc="a2a.SubscribeToTask"
        ) == value(before, OPEN, rpc="a2a.SubscribeToTask"):
            break
        await asyncio.sleep(0.05)
    assert value(after, OPEN, rpc=rpc) == value(before, OPEN, rpc=rpc)
    assert value(after, OPEN, rpc="a2a.SubscribeToTask") == value(
        before, OPEN, rpc="a2a.SubscribeToTask"
    )
    assert calls(before, after, rpc, "CANCELLED") == 1
    assert calls(before, after, "a2a.SubscribeToTask", "CANCELLED") == 1


async def test_calls_refused_before_the_handler_are_counted_too(
    start_keel: Callable[..., Any],
) -> None:
    keel = await metered_keel(start_keel)
    url = agent_url(keel)
    before = await scrape(keel)

    def rpc(method: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}

    async with httpx.AsyncClient() as http:

        async def error(body: Any, headers: dict[str, str] = VERSION) -> int:
            response = await http.post(url, json=body, headers=headers)
            return int(response.json()["error"]["code"])

        # Methods that are not A2A's: one label, however many names.
        for name in ("Nope", "message/send", "x" * 300):
            assert await error(rpc(name, {})) == -32601
        # A 0.3 client: no A2A-Version header.
        assert await error(rpc("GetTask", {"id": "x"}), headers={}) == -32009
        assert await error(rpc("GetTask", {"id": 5, "historyLength": "x"})) == -32602
        assert await error(rpc("GetTask", {"id": str(uuid.uuid4())})) == -32001  # the handler's
        rest = await http.get(f"{url}/rest/tasks/{uuid.uuid4()}")  # no version header
        assert rest.status_code == 400
        assert (await http.get(f"{url}/rest/nothing", headers=VERSION)).status_code == 404

    after = await scrape(keel)
    assert calls(before, after, "a2a.unknown", "UNIMPLEMENTED") == 3
    assert calls(before, after, "a2a.GetTask", "FAILED_PRECONDITION") == 2  # version
    assert calls(before, after, "a2a.GetTask", "INVALID_ARGUMENT") == 1
    assert calls(before, after, "a2a.GetTask", "NOT_FOUND") == 1
    assert calls(before, after, "a2a.unknown", "NOT_FOUND") == 1
    labels = {dict(labels)["method"] for name, labels in after if name == COUNT and labels} - {
        dict(labels)["method"] for name, labels in before if name == COUNT and labels
    }
    assert labels <= {"a2a.unknown", "a2a.GetTask"}


def test_rest_routes_name_their_operation() -> None:
    routes = {
        ("POST", "message:send"): "SendMessage",
        ("POST", "message:stream"): "SendStreamingMessage",
        ("GET", "tasks"): "ListTasks",
        ("GET", "tasks/abc"): "GetTask",
        ("POST", "tasks/abc:cancel"): "CancelTask",
        ("GET", "tasks/abc:subscribe"): "SubscribeToTask",
        ("POST", "tasks/abc:subscribe"): "SubscribeToTask",
        ("POST", "tasks/abc/pushNotificationConfigs"): "CreateTaskPushNotificationConfig",
        ("GET", "tasks/abc/pushNotificationConfigs"): "ListTaskPushNotificationConfigs",
        ("GET", "tasks/abc/pushNotificationConfigs/p"): "GetTaskPushNotificationConfig",
        ("DELETE", "tasks/abc/pushNotificationConfigs/p"): "DeleteTaskPushNotificationConfig",
        ("GET", "extendedAgentCard"): "GetExtendedAgentCard",
        ("GET", "message:send"): "",
        ("DELETE", "tasks/abc"): "",
        ("GET", "tasks/"): "",
        ("GET", "tasks/abc/other"): "",
        ("GET", "tasks/abc/pushNotificationConfigs/p/q"): "",
        ("GET", "nothing"): "",
    }
    for (method, route), operation in routes.items():
        assert metered.rest_operation(method, route) == operation, (method, route)
        assert metered.label(operation) == (f"a2a.{operation}" if operation else "a2a.unknown")
    assert metered.label("Nope") == metered.label(None) == "a2a.unknown"


def test_answers_refused_before_the_handler_map_to_codes() -> None:
    def jsonrpc(code: int) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": code}}).encode()

    assert metered.response_code(200, jsonrpc(-32601)) == "UNIMPLEMENTED"
    assert metered.response_code(200, jsonrpc(-32700)) == "INVALID_ARGUMENT"
    assert metered.response_code(200, jsonrpc(-32009)) == "FAILED_PRECONDITION"
    assert metered.response_code(200, jsonrpc(-32001)) == "NOT_FOUND"
    assert metered.response_code(200, jsonrpc(-1)) == "UNKNOWN"
    rest = {"error": {"code": 400, "status": "FAILED_PRECONDITION", "message": "version"}}
    assert metered.response_code(400, json.dumps(rest).encode()) == "FAILED_PRECONDITION"
    assert metered.response_code(404, b'{"code": "not_found", "message": "no"}') == "NOT_FOUND"
    assert metered.response_code(405, b"Method Not Allowed") == "UNIMPLEMENTED"
    assert metered.response_code(502, b"") == "INTERNAL"
    assert metered.response_code(418, b"") == "UNKNOWN"
