"""The HTTP port (--http-port): AgentService over Connect and gRPC-Web, compared call for call
with gRPC on the same server; its auth and tenants; its own errors; CORS; the console's files.

The Connect clients are connectrpc's generated ones (keel.v1.agent_service_connect), over
HTTP/1.1 and HTTP/2 (pyqwest), with the binary and the JSON codec.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pyqwest
import pytest
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from google.protobuf import json_format
from google.rpc import error_details_pb2
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel.v1.agent_service_connect import AgentServiceClient

from server.app import Keel
from server.auth.keys import Role, add_key
from server.settings import ConfigurationError, Settings, check_settings
from tests.certs import Authority
from tests.integration.conftest import Collected, assert_contiguous, collect, script, text
from tests.processes import ROOT

# name: (protocol, JSON codec?, HTTP/2?)
TRANSPORTS = {
    "connect-binary-http1": (ProtocolType.CONNECT, False, False),
    "connect-json-http1": (ProtocolType.CONNECT, True, False),
    "connect-binary-http2": (ProtocolType.CONNECT, False, True),
    "connect-json-http2": (ProtocolType.CONNECT, True, True),
    "grpc-web-binary-http1": (ProtocolType.GRPC_WEB, False, False),
    "grpc-web-json-http2": (ProtocolType.GRPC_WEB, True, True),
}


def base_url(keel: Keel) -> str:
    assert keel.http is not None
    return f"http://127.0.0.1:{keel.http.port}"


class Clients:
    """Connect clients of one server, closed at the end of the test."""

    def __init__(self) -> None:
        self._open: list[Any] = []

    async def connect(
        self, keel: Keel, transport: str = "connect-binary-http1"
    ) -> AgentServiceClient:
        protocol, json_codec, http2 = TRANSPORTS[transport]
        http_client = pyqwest.Client(
            pyqwest.HTTPTransport(http_version=pyqwest.HTTPVersion.HTTP2 if http2 else None)
        )
        codec = google_protobuf_json_codec() if json_codec else google_protobuf_binary_codec()
        client = AgentServiceClient(
            base_url(keel), protocol=protocol, codec=codec, http_client=http_client
        )
        self._open.append(client)
        return client

    async def close(self) -> None:
        for client in self._open:
            await client.close()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    opened = Clients()
    yield opened
    await opened.close()


async def web_keel(start_keel: Callable[..., Any], **overrides: Any) -> Keel:
    keel: Keel = await start_keel(http_port=0, **overrides)
    return keel


def error_info(exc: ConnectError) -> error_details_pb2.ErrorInfo:
    for detail in exc.details:
        if detail.type_name == "google.rpc.ErrorInfo":
            return error_details_pb2.ErrorInfo.FromString(detail.message_bytes)
    raise AssertionError(f"no ErrorInfo in {exc!r}")


async def connect_collect(responses: AsyncIterator[Any]) -> Collected:
    collected = Collected()
    async for response in responses:
        collected.add(response)
    return collected


@pytest.mark.parametrize("transport", list(TRANSPORTS))
async def test_the_same_calls_over_grpc_and_connect_give_the_same_answers(
    start_keel: Callable[..., Any], clients: Clients, transport: str
) -> None:
    keel = await web_keel(start_keel)
    web = await clients.connect(keel, transport)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        assert await web.list_agents(pb.ListAgentsRequest()) == await stub.ListAgents(
            pb.ListAgentsRequest()
        )
        # A run streamed over the HTTP port is the run gRPC sees, event for event.
        streamed = await connect_collect(
            web.stream(pb.StreamRequest(agent_id="scripted", input=script(text(20))))
        )
        assert_contiguous(streamed.events)
        assert streamed.events[-1].HasField("finish")
        observed = await collect(stub.Observe(pb.ObserveRequest(run_id=streamed.run_id)))
        assert streamed.events == observed.events
        request = pb.GetRunRequest(run_id=streamed.run_id)
        assert await web.get_run(request) == await stub.GetRun(request)
        # Observe from an offset: the rest, exactly once.
        rest = await connect_collect(
            web.observe(pb.ObserveRequest(run_id=streamed.run_id, offset=7))
        )
        assert rest.events == observed.events[7:]
        # The same error: code, message and details.
        missing = pb.GetRunRequest(run_id="0" * 32)
        with pytest.raises(grpc.aio.AioRpcError) as grpc_error:
            await stub.GetRun(missing)
        with pytest.raises(ConnectError) as connect_error:
            await web.get_run(missing)
        assert grpc_error.value.code() == grpc.StatusCode.NOT_FOUND
        assert connect_error.value.code == Code.NOT_FOUND
        assert connect_error.value.message == grpc_error.value.details()
        assert error_info(connect_error.value).reason == "RUN_NOT_FOUND"
        # A malformed request: INVALID_ARGUMENT with the same field violations.
        with pytest.raises(ConnectError) as bad:
            await web.start_run(pb.StartRunRequest(agent_id="nobody", input="{}"))
        assert bad.value.code == Code.INVALID_ARGUMENT
        assert error_info(bad.value).reason == "UNKNOWN_AGENT"


async def test_a_suspended_run_is_resumed_over_connect(
    start_keel: Callable[..., Any], clients: Clients
) -> None:
    keel = await web_keel(start_keel)
    web = await clients.connect(keel, "connect-json-http1")
    approve = {"tool": "approve_me", "args": {"action": "deploy"}}
    started = await web.start_run(
        pb.StartRunRequest(agent_id="scripted", input=script(text(2), approve, text(2)))
    )
    run_id = started.run.run_id
    first = await connect_collect(
        web.observe(pb.ObserveRequest(run_id=run_id, stop_at_suspend=True))
    )
    call = next(e.tool_call for e in first.events if e.HasField("tool_call"))
    decision = pb.Decision(tool_call_id=call.tool_call_id, approve=pb.Approve())
    resumed = await connect_collect(
        web.resume(pb.ResumeRequest(run_id=run_id, decisions=[decision]))
    )
    assert resumed.events[0].HasField("resumed")
    assert resumed.events[-1].HasField("finish")
    assert_contiguous(first.events + resumed.events)


async def test_keys_roles_and_tenants_apply_on_the_http_port(
    start_keel: Callable[..., Any], clients: Clients, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.jsonl"
    a_runner = add_key(keys, "tenant-a", Role.RUNNER)
    a_reader = add_key(keys, "tenant-a", Role.READER)
    b_admin = add_key(keys, "tenant-b", Role.ADMIN)
    keel = await web_keel(start_keel, api_keys_file=str(keys))
    for transport in ("connect-json-http1", "grpc-web-binary-http1"):
        web = await clients.connect(keel, transport)
        with pytest.raises(ConnectError) as anonymous:
            await web.list_agents(pb.ListAgentsRequest())
        assert anonymous.value.code == Code.UNAUTHENTICATED
        with pytest.raises(ConnectError) as unknown:
            await web.list_agents(pb.ListAgentsRequest(), headers={"authorization": "Bearer x"})
        assert unknown.value.code == Code.UNAUTHENTICATED
        request = pb.StartRunRequest(agent_id="scripted", input=script(text(1)))
        with pytest.raises(ConnectError) as denied:
            await web.start_run(request, headers={"authorization": f"Bearer {a_reader}"})
        assert denied.value.code == Code.PERMISSION_DENIED
        started = await web.start_run(request, headers={"authorization": f"Bearer {a_runner}"})
        get = pb.GetRunRequest(run_id=started.run.run_id)
        run = await web.get_run(get, headers={"authorization": f"Bearer {a_reader}"})
        assert run.run.run_id == started.run.run_id
        with pytest.raises(ConnectError) as hidden:  # another tenant's run is missing
            await web.get_run(get, headers={"authorization": f"Bearer {b_admin}"})
        assert hidden.value.code == Code.NOT_FOUND
    # The SSE route passes the same gate.
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        url = f"/v1/runs/{started.run.run_id}/events"
        assert (await http.get(url)).status_code == 401
        other = await http.get(url, headers={"authorization": f"Bearer {b_admin}"})
        assert other.status_code == 404
        mine = await http.get(url, headers={"authorization": f"Bearer {a_reader}"})
        assert mine.status_code == 200
        assert mine.text.startswith("event: snapshot\n")


# Server-Sent Events, with a plain HTTP client.


def parse_sse(body: str) -> list[dict[str, str]]:
    """The messages (and comments, as {"comment": ...}) of an SSE body."""
    messages = []
    for block in body.split("\n\n"):
        if not block:
            continue
        message: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            message[name or "comment"] = value.removeprefix(" ")
        messages.append(message)
    return messages


async def read_events(
    http: httpx2.AsyncClient, url: str, *, headers: dict[str, str], stop_after: int | None = None
) -> tuple[list[dict[str, str]], int]:
    """The SSE messages of one connection (closed after `stop_after` events), and its status."""
    messages: list[dict[str, str]] = []
    buffer = ""
    events = 0
    async with http.stream("GET", url, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return [], response.status_code
        async for chunk in response.aiter_text():
            buffer += chunk
            *blocks, buffer = buffer.split("\n\n")
            for block in blocks:
                (message,) = parse_sse(block + "\n\n")
                messages.append(message)
                events += "id" in message
                if stop_after is not None and events == stop_after:
                    return messages, 200  # drop the connection here
    return messages, 200


async def test_sse_resumes_with_last_event_id_exactly_like_observe(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel, heartbeat_interval_s=0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        started = await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(12, delay_ms=120)))
        )
        run_id = started.run.run_id
        url = f"/v1/runs/{run_id}/events"
        seen: list[dict[str, str]] = []
        async with httpx2.AsyncClient(base_url=base_url(keel), timeout=60) as http:
            # What an EventSource does: connect, drop, reconnect with the last id it saw.
            headers: dict[str, str] = {}
            connections = 0
            while True:
                messages, code = await read_events(http, url, headers=headers, stop_after=3)
                connections += 1
                if code == 204:
                    break  # the run ended and everything was read: stop reconnecting
                assert code == 200
                assert messages[0]["event"] == "snapshot"
                seen += messages
                ids = [m["id"] for m in messages if "id" in m]
                if ids:
                    headers = {"last-event-id": ids[-1]}
            # Heartbeats are comments, never messages with an id.
            assert any(m.get("comment", "").startswith("heartbeat") for m in seen)
            # ?offset= for the first connection.
            tail, code = await read_events(http, url + "?offset=9", headers={})
        observed = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id)))
    events = [m for m in seen if "id" in m]
    assert connections > 3
    assert [int(m["id"]) for m in events] == list(range(len(observed.events)))
    for message, event in zip(events, observed.events, strict=True):
        assert json_format.Parse(message["data"], pb.AgentEvent()) == event
    assert [int(m["id"]) for m in tail if "id" in m] == list(range(9, len(observed.events)))


async def test_sse_errors_are_http_statuses_with_json_bodies(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        run = await collect(
            stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(3))))
        )
    url = f"/v1/runs/{run.run_id}/events"
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        cases = [
            (url, {"last-event-id": "seven"}, 400, "invalid_argument"),
            (url, {"last-event-id": "-1"}, 400, "invalid_argument"),
            (url + "?offset=x", {}, 400, "invalid_argument"),
            (url + f"?offset={len(run.events) + 5}", {}, 400, "out_of_range"),
            ("/v1/runs/" + "0" * 32 + "/events", {}, 404, "not_found"),
            ("/v1/runs/not%20an%20id/events", {}, 400, "invalid_argument"),
        ]
        for path, headers, status, code in cases:
            response = await http.get(path, headers=headers)
            assert (response.status_code, response.json()["code"]) == (status, code), path
            assert response.headers["content-type"] == "application/json"
        ended = await http.get(url, headers={"last-event-id": str(len(run.events) - 1)})
        assert ended.status_code == 204


async def test_unknown_routes_methods_and_bodies(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        nowhere = await http.get("/v2/nothing")
        assert nowhere.status_code == 404
        assert nowhere.json()["code"] == "not_found"
        no_method = await http.post("/keel.v1.AgentService/Nope", content=b"{}")
        assert no_method.status_code == 404
        assert no_method.json()["code"] == "not_found"
        get = await http.get("/keel.v1.AgentService/ListAgents")
        assert get.status_code == 405
        assert get.headers["allow"] == "POST"
        assert get.json()["code"] == "unimplemented"
        delete = await http.delete(f"/v1/runs/{'0' * 32}/events")
        assert (delete.status_code, delete.headers["allow"]) == (405, "GET")
        json_call = {"content-type": "application/json"}
        malformed = await http.post(
            "/keel.v1.AgentService/GetRun", content=b"{not json", headers=json_call
        )
        assert malformed.status_code == 400
        assert malformed.json()["code"] == "invalid_argument"
        # Fields this server does not know are ignored, as in binary protobuf (a newer
        # client's request still works).
        newer = await http.post(
            "/keel.v1.AgentService/GetRun",
            content=json.dumps({"runId": "0" * 32, "someFutureField": 1}),
            headers=json_call,
        )
        assert newer.json()["code"] == "not_found"
        wrong_type = await http.post(
            "/keel.v1.AgentService/ListRuns", content=b'{"pageSize": "ten"}', headers=json_call
        )
        assert wrong_type.json()["code"] == "invalid_argument"
        text_plain = await http.post(
            "/keel.v1.AgentService/GetRun", content=b"{}", headers={"content-type": "text/plain"}
        )
        assert text_plain.status_code == 415
        # A Connect call's domain error: Connect's status and body, the details in them.
        missing = await http.post(
            "/keel.v1.AgentService/GetRun",
            content=json.dumps({"runId": "0" * 32}),
            headers=json_call,
        )
        assert missing.status_code == 404
        body = missing.json()
        assert body["code"] == "not_found"
        assert body["details"][0]["type"] == "google.rpc.ErrorInfo"


async def test_cors_serves_only_the_configured_origins(start_keel: Callable[..., Any]) -> None:
    allowed = "https://console.example.com"
    keel = await web_keel(start_keel, http_cors_origins=f"{allowed}, https://other.example.com")
    route = "/keel.v1.AgentService/ListAgents"
    json_call = {"content-type": "application/json"}
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        preflight = await http.options(
            route,
            headers={
                "origin": allowed,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,connect-protocol-version",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert "connect-protocol-version" in preflight.headers["access-control-allow-headers"]
        call = await http.post(route, content=b"{}", headers={**json_call, "origin": allowed})
        assert call.status_code == 200
        assert call.headers["access-control-allow-origin"] == allowed
        assert "grpc-status" in call.headers["access-control-expose-headers"]
        for origin in ("https://evil.example.com", "http://console.example.com"):
            refused = await http.post(route, content=b"{}", headers={**json_call, "origin": origin})
            assert refused.status_code == 403
            assert refused.json()["code"] == "permission_denied"
            assert "access-control-allow-origin" not in refused.headers
            preflight = await http.options(
                route, headers={"origin": origin, "access-control-request-method": "POST"}
            )
            assert preflight.status_code == 403
        # The port's own origin (the console's pages) needs no CORS.
        own = f"http://127.0.0.1:{keel.http.port}" if keel.http else ""
        same = await http.post(route, content=b"{}", headers={**json_call, "origin": own})
        assert same.status_code == 200


async def test_without_cors_origins_no_other_origin_is_served(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel)
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        refused = await http.post(
            "/keel.v1.AgentService/ListAgents",
            content=b"{}",
            headers={"content-type": "application/json", "origin": "https://a.example.com"},
        )
        assert refused.status_code == 403


async def test_the_console_files_are_served_under_console(
    start_keel: Callable[..., Any], tmp_path: Path
) -> None:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>Keel</title>")
    (dist / "assets" / "app-1234.js").write_text("console.log('keel')")
    (tmp_path / "secret.txt").write_text("not for you")
    keel = await web_keel(start_keel, console_dir=str(dist))
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        root = await http.get("/")
        assert (root.status_code, root.headers["location"]) == (308, "/console/")
        index = await http.get("/console/")
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        assert "<title>Keel</title>" in index.text
        script_file = await http.get("/console/assets/app-1234.js")
        assert script_file.headers["content-type"].startswith(
            ("text/javascript", "application/javascript")
        )
        assert "immutable" in script_file.headers["cache-control"]
        for path in ("/console/../secret.txt", "/console/%2e%2e/secret.txt", "/console/nope.js"):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert response.json()["code"] == "not_found"
        posted = await http.post("/console/")
        assert posted.status_code == 405


async def test_an_unbuilt_console_says_how_to_build_it(
    start_keel: Callable[..., Any], tmp_path: Path
) -> None:
    keel = await web_keel(start_keel, console_dir=str(tmp_path / "missing"))
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        response = await http.get("/console/")
        assert response.status_code == 404
        assert "npm run build --prefix console" in response.json()["message"]


async def test_the_http_port_serves_tls_with_the_servers_certificate(
    start_keel: Callable[..., Any], tmp_path: Path
) -> None:
    authority = Authority()
    server = authority.server()
    (tmp_path / "server.pem").write_bytes(server.certificate)
    (tmp_path / "server.key").write_bytes(server.key)
    keel = await web_keel(
        start_keel,
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.key"),
    )
    assert keel.http is not None
    for version in (None, pyqwest.HTTPVersion.HTTP2):
        transport = pyqwest.HTTPTransport(tls_ca_cert=authority.certificate, http_version=version)
        async with AgentServiceClient(
            f"https://127.0.0.1:{keel.http.port}", http_client=pyqwest.Client(transport)
        ) as web:
            agents = await web.list_agents(pb.ListAgentsRequest())
            assert [a.agent_id for a in agents.agents] == ["scripted", "scripted-judge"]


def test_client_certificates_alone_cannot_guard_the_http_port() -> None:
    settings = Settings(
        http_port=0, tls_cert_file="s.pem", tls_key_file="s.key", tls_client_ca_file="ca.pem"
    )
    with pytest.raises(ConfigurationError, match="API key only"):
        check_settings(settings)


async def test_open_streams_end_when_the_server_stops(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        started = await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(500, delay_ms=50)))
        )
    async with httpx2.AsyncClient(base_url=base_url(keel), timeout=30) as http:
        url = f"/v1/runs/{started.run.run_id}/events"
        reading = asyncio.ensure_future(read_events(http, url, headers={}))
        await asyncio.sleep(0.5)
        await keel.stop(grace_s=0)
        messages, code = await asyncio.wait_for(reading, 30)
    assert code == 200
    assert messages[-1]["event"] == "error"
    assert json.loads(messages[-1]["data"])["code"] == "unavailable"


# Found by fuzzing the HTTP port (tests/fuzz).


async def test_a_call_connectrpc_cannot_decode_gets_a_json_error_not_a_500(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel)
    route = "/keel.v1.AgentService/GetRun"
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        # connectrpc decodes every header as UTF-8: one that is not was a 500 ("unknown").
        latin1 = await http.post(
            route,
            content=b"{}",
            headers=[(b"content-type", b"application/json"), (b"x-name", b"caf\xe9")],
        )
        assert latin1.status_code == 400
        assert latin1.json()["code"] == "invalid_argument"
        assert "x-name" in latin1.json()["message"]
        # gRPC over HTTP/1.1 (no trailers) was grpc-status 2, UNKNOWN, and an exception.
        grpc_http1 = await http.post(
            route, content=b"\x00\x00\x00\x00\x00", headers={"content-type": "application/grpc"}
        )
        assert grpc_http1.status_code == 415
        assert grpc_http1.json()["code"] == "unimplemented"
        assert "HTTP/2" in grpc_http1.json()["message"]
        # connectrpc's 415 had no body; now it has Connect's, and keeps Accept-Post.
        for content_type in ("text/plain", "application/json"):  # the latter: a stream's
            path = "/keel.v1.AgentService/" + ("Observe" if "json" in content_type else "GetRun")
            refused = await http.post(path, content=b"{}", headers={"content-type": content_type})
            assert refused.status_code == 415
            assert refused.headers["content-type"] == "application/json"
            assert refused.json()["code"] == "unimplemented"
            assert "accept-post" in refused.headers
        # The same call, well formed, is unchanged.
        fine = await http.post(
            route, content=b'{"runId": "x"}', headers={"content-type": "application/json"}
        )
        assert (fine.status_code, fine.json()["code"]) == (404, "not_found")


async def test_head_on_a_live_runs_events_ends_and_the_connection_serves_the_next_request(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        approve = {"tool": "approve_me", "args": {"action": "x"}}
        started = await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(approve))
        )
    # One connection (HTTP/1.1 keep-alive): HEAD's stream held it, and the next request on
    # it got no answer.
    limits = httpx2.Limits(max_connections=1)
    async with httpx2.AsyncClient(base_url=base_url(keel), timeout=10, limits=limits) as http:
        head = await http.head(f"/v1/runs/{started.run.run_id}/events")
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        after = await http.post(
            "/keel.v1.AgentService/ListAgents",
            content=b"{}",
            headers={"content-type": "application/json"},
        )
        assert after.status_code == 200


async def test_answers_that_come_before_the_body_leave_the_connection_serving(
    start_keel: Callable[..., Any],
) -> None:
    keel = await web_keel(start_keel)
    listing = ("/keel.v1.AgentService/ListAgents", {"content-type": "application/json"})
    early = [  # each answered before its body is read
        ("/nope", "application/json", b"{}"),
        ("/keel.v1.AgentService/GetRun", "text/plain", b"x" * 1000),
        ("/keel.v1.AgentService/Stream", "application/json", b"{}"),  # 415: a stream's
        ("/keel.v1.AgentService/CreateThread", "application/grpc-web+json", b"\0\0\0\0\2+1"),
    ]
    # HTTP/2: a DATA frame after the answer (this client ends each request with an empty
    # one) made hypercorn drop the connection, and every stream on it.
    async with httpx2.AsyncClient(
        base_url=base_url(keel), http1=False, http2=True, timeout=10
    ) as http:
        for _ in range(25):
            for path, content_type, body in early:
                answer = await http.post(path, content=body, headers={"content-type": content_type})
                assert answer.status_code in (200, 404, 415), path
        assert (await http.post(listing[0], content=b"{}", headers=listing[1])).status_code == 200
    # HTTP/1.1: after a 1 MB body answered unread, the next request on the connection could
    # go unanswered.
    limits = httpx2.Limits(max_connections=1)
    async with httpx2.AsyncClient(base_url=base_url(keel), timeout=10, limits=limits) as http:
        for path, content_type, _ in early:
            body = b"\0" * (1 << 20)
            await http.post(path, content=body, headers={"content-type": content_type})
            after = await http.post(listing[0], content=b"{}", headers=listing[1])
            assert after.status_code == 200, path


async def test_paths_are_decoded_once_and_quoted_briefly(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        run = await collect(
            pb_grpc.AgentServiceStub(channel).Stream(
                pb.StreamRequest(agent_id="scripted", input=script(text(1)))
            )
        )
    async with httpx2.AsyncClient(base_url=base_url(keel)) as http:
        # "%25" is "%": "/v1/runs/%2561.../events" names the run "%61...", which is no
        # run id; decoded twice it would be "a...", the run.
        once = f"%25{ord(run.run_id[0]):x}{run.run_id[1:]}"
        response = await http.get(f"/v1/runs/{once}/events")
        assert response.status_code == 400
        assert response.json()["code"] == "invalid_argument"
        long_path = "/" + "x" * 60_000
        for method, path in (("GET", long_path), ("GET", "/v1/runs/" + "y" * 60_000 + "/events")):
            response = await http.request(method, path)
            assert response.status_code in (400, 404)
            assert len(response.json()["message"]) < 1000
        not_allowed = await http.request("PUT", "/v1/runs/" + "z" * 60_000 + "/events")
        assert not_allowed.status_code == 405
        assert len(not_allowed.json()["message"]) < 1000


def test_an_http_port_in_use_stops_the_server_with_a_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--port", "0", "--http-port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert f"serve: cannot bind the HTTP port 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
