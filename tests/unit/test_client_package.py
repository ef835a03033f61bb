"""The Python client is a distribution of its own (clients/python), and the server uses it.

keel-client holds the generated keel.v1 package and keel_client, typed
(py.typed, .pyi stubs), with no dependency on the server; the server depends
on keel-client instead of carrying a copy of the generated code.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
_NOT_SOURCES = {"node_modules", "build", "dist"}  # installs and build outputs


def _pyproject(path: Path) -> dict[str, object]:
    with path.open("rb") as file:
        return tomllib.load(file)


def _requirement_names(requirements: list[str]) -> set[str]:
    return {
        req.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip() for req in requirements
    }


def test_client_distribution_depends_on_grpc_and_protobuf_and_the_cli_libraries_only() -> None:
    project = _pyproject(CLIENT / "pyproject.toml")["project"]
    assert isinstance(project, dict)
    assert project["name"] == "keel-client"
    assert _requirement_names(project["dependencies"]) == {
        "grpcio",
        "grpcio-status",
        "protobuf",
        "typer",  # the `keel` command
        "rich",
    }
    assert project["scripts"] == {"keel": "keel_client.cli:main"}


def test_client_distribution_ships_its_type_information() -> None:
    setuptools = _pyproject(CLIENT / "pyproject.toml")["tool"]
    assert isinstance(setuptools, dict)
    package_data = setuptools["setuptools"]["package-data"]["*"]
    assert "py.typed" in package_data and "*.pyi" in package_data
    for typed in ("keel/py.typed", "keel_client/py.typed"):
        assert (CLIENT / typed).is_file(), typed
    for stub in ("agent_service_pb2.pyi", "agent_service_pb2_grpc.pyi"):
        assert (CLIENT / "keel" / "v1" / stub).is_file(), stub


def test_server_depends_on_the_client_distribution_not_a_copy() -> None:
    server = _pyproject(ROOT / "pyproject.toml")["project"]
    assert isinstance(server, dict)
    assert "keel-client" in _requirement_names(server["dependencies"])
    copies = [
        path.relative_to(ROOT)
        for path in ROOT.rglob("agent_service_pb2*.py")
        if not any(part.startswith(".") or part in _NOT_SOURCES for part in path.parts)
        and path.parent != CLIENT / "keel" / "v1"
    ]
    assert copies == []


def test_client_imports_nothing_of_the_server(tmp_path: Path) -> None:
    code = (
        "import sys, keel_client, keel_client.sync, keel_client.cli\n"
        "import keel.v1.agent_service_pb2_grpc\n"
        "leaked = sorted(m for m in sys.modules if m == 'server' or m.startswith('server.'))\n"
        "sys.exit(f'keel_client imported {leaked}' if leaked else 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
