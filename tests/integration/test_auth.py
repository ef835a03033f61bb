"""Authentication and roles: API keys from a keys file, client certificates (mutual TLS),
reader/runner/admin per RPC, and bad credentials, on a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from a2a.types import a2a_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from keel.v1 import agent_service_pb2 as pb
from keel_client import KeelClient

from server.api.servicer import SERVICE
from server.app import Keel, exposed
from server.auth.gate import A2A_METHOD_ROLES, A2A_SERVICE, METHOD_ROLES
from server.auth.keys import Role, add_key
from tests.certs import Authority
from tests.integration.conftest import script, text
from tests.integration.test_streams import error_info

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend() -> str:
    return "memory"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, dict[Role, str]]:
    path = tmp_path / "keys.jsonl"
    return path, {role: add_key(path, "acme", role) for role in Role}


async def call(
    channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.StatusCode:
    """Call `method` with an empty request; the status code it ends with."""
    descriptor = SERVICE.methods_by_name[method]
    request_type = getattr(pb, descriptor.input_type.name)
    response_type = getattr(pb, descriptor.output_type.name)
    path = f"/{SERVICE.full_name}/{method}"
    try:
        if descriptor.server_streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            async for _ in stream(request_type(), metadata=metadata, timeout=10):
                pass
        else:
            unary = channel.unary_unary(
                path,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            await unary(request_type(), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_has_a_role() -> None:
    assert set(METHOD_ROLES) == {m.name for m in SERVICE.methods}
    a2a_service = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"]
    assert a2a_service.full_name == A2A_SERVICE
    assert set(A2A_METHOD_ROLES) == {m.name for m in a2a_service.methods}


def test_keys_add_prints_a_key_and_stores_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    command = ["keys", "add", "--file", str(path), "--tenant", "acme", "--role", "runner"]
    done = subprocess.run(
        [sys.executable, "-m", "server", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    key = done.stdout.strip()
    assert key.startswith("keel_") and key not in path.read_text()
    [entry] = [json.loads(line) for line in path.read_text().splitlines()]
    assert (entry["tenant"], entry["role"]) == ("acme", "runner") and len(entry["sha256"]) == 64
    assert path.stat().st_mode & 0o777 == 0o600


async def test_without_a_valid_key_every_rpc_is_unauthenticated(
    start_keel: Callable[..., Any], keys: tuple[Path, dict[Role, str]]
) -> None:
    path, issued = keys
    keel: Keel = await start_keel(api_keys_file=str(path))
    wrong = "keel_00000000_" + "A" * 43
    forged = issued[Role.ADMIN][:-4] + "AAAA"  # a known id with another secret
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        for method in METHOD_ROLES:
            for metadata in (
                (),
                (("authorization", f"Bearer {wrong}"),),
                (("authorization", f"Bearer {forged}"),),
                (("authorization", "Basic dXNlcjpwYXNz"),),
                (("authorization", "Bearer"),),
                (("authorization", issued[Role.ADMIN]),),  # the key without "Bearer "
            ):
                assert await call(channel, method, metadata) == grpc.StatusCode.UNAUTHENTICATED, (
                    method,
                    metadata,
                )
        # Health and reflection stay open.
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_each_role_may_call_exactly_its_rpcs(
    start_keel: Callable[..., Any], keys: tuple[Path, dict[Role, str]]
) -> None:
    path, issued = keys
    keel: Keel = await start_keel(api_keys_file=str(path))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        for role, key in issued.items():
            metadata = (("authorization", f"Bearer {key}"),)
            for method, needed in METHOD_ROLES.items():
                code = await call(channel, method, metadata)
                if role.allows(needed):
                    # Past the gate: the empty request itself may be bad input.
                    assert code != grpc.StatusCode.PERMISSION_DENIED, (role, method)
                    assert code != grpc.StatusCode.UNAUTHENTICATED, (role, method)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (role, method)
    # A reader's write, through the client wrapper: the reason names what it needs.
    async with KeelClient(f"127.0.0.1:{keel.port}", api_key=issued[Role.READER]) as client:
        assert await client.list_agents()
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await client.start_run("scripted", script(text(1)))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = error_info(denied.value)
        assert (info.reason, info.metadata["needed_role"]) == ("PERMISSION_DENIED", "runner")
    async with KeelClient(f"127.0.0.1:{keel.port}", api_key=issued[Role.RUNNER]) as client:
        events = [e async for e in client.stream("scripted", script(text(2))).events()]
        assert events[-1].WhichOneof("payload") == "finish"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ('{"id": "0e41d5fd", "sha256": "' + "a" * 64 + '", "tenant": "t"}\n', "line 1"),
        ("# a comment\n\nnot json\n", "line 3"),
        (
            '{"id": "0e41d5fd", "sha256": "' + "a" * 64 + '", "tenant": "t", "role": "root"}\n',
            "line 1",
        ),
    ],
)
def test_a_bad_keys_file_stops_the_server_naming_the_line(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "keys.jsonl"
    if content is not None:
        path.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", "--api-keys-file", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert problem in done.stderr and str(path) in done.stderr, done.stderr


async def test_mutual_tls_names_the_tenant_and_role_from_the_client_certificate(
    start_keel: Callable[..., Any], tmp_path: Path
) -> None:
    authority, stranger = Authority(), Authority("another CA")
    server = authority.server()
    for name, data in {
        "ca.pem": authority.certificate,
        "server.pem": server.certificate,
        "server.key": server.key,
    }.items():
        (tmp_path / name).write_bytes(data)
    keel: Keel = await start_keel(
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.key"),
        tls_client_ca_file=str(tmp_path / "ca.pem"),
    )
    target = f"127.0.0.1:{keel.port}"

    def client(issued: Any) -> KeelClient:
        chain = None if issued is None else (issued.certificate, issued.key)
        return KeelClient(
            target,
            root_certificates=authority.certificate,
            client_certificate=chain,
            max_reconnects=0,
        )

    async with client(authority.client("acme", "runner")) as runner:
        events = [e async for e in runner.stream("scripted", script(text(2))).events()]
        assert events[-1].WhichOneof("payload") == "finish"
    async with client(authority.client("acme", "reader")) as reader:
        assert await reader.list_agents()
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await reader.start_run("scripted", script(text(1)))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with client(authority.client("acme", "boss")) as unknown_role:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unknown_role.list_agents()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Certificates the server must refuse at the handshake: no call gets through.
    for bad in (
        None,
        stranger.client("acme", "admin"),
        authority.client("acme", "admin", expired=True),
    ):
        async with client(bad) as refused_client:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await refused_client.list_agents()
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("host", "warned"),
    [
        ("127.0.0.1", False),
        ("127.0.0.5", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("10.1.2.3", True),
        ("keel.internal", True),
    ],
)
def test_an_open_server_warns_when_it_binds_beyond_loopback(host: str, warned: bool) -> None:
    assert exposed(host) is warned


async def test_reflection_needs_no_key(
    start_keel: Callable[..., Any], keys: tuple[Path, dict[Role, str]]
) -> None:
    path, _ = keys
    keel: Keel = await start_keel(api_keys_file=str(path))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for response in stub.ServerReflectionInfo(requests()):
            names = {s.name for s in response.list_services_response.service}
            assert SERVICE.full_name in names
            break
