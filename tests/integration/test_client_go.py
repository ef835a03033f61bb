"""Proof from another language: Go, with the stubs buf generates (clients/go).

The generated package and examples/go (the resume loop of docs/clients.md,
in Go) build offline against Debian's Go toolchain and grpc-go sources
(GOPATH mode over /usr/share/gocode; scripts/bootstrap installs them), and
the example streams a run from a real Keel server, drops it, resumes it and
checks every event arrived exactly once.

Without `go` on PATH the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.processes import ROOT, assert_demo_resumes

GO = shutil.which("go")
DEBIAN_GOPATH = Path("/usr/share/gocode")
BUILD_TIMEOUT_S = 300

if GO is None and not os.environ.get("CI"):
    pytest.skip(
        "no Go toolchain (scripts/bootstrap installs Debian's golang-go)", allow_module_level=True
    )


def _module_root() -> str:
    """The import path of the repository, from clients/go/go.mod's module line."""
    go_mod = (ROOT / "clients" / "go" / "go.mod").read_text()
    match = re.search(r"^module (\S+)/clients/go$", go_mod, re.MULTILINE)
    assert match, "clients/go/go.mod names no module ending in /clients/go"
    return match.group(1)


@pytest.fixture(scope="module")
def gopath(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GOPATH whose src/ holds the repository's Go code (symlinked) under its import path."""
    assert GO is not None, "CI needs a Go toolchain: run scripts/bootstrap"
    path = tmp_path_factory.mktemp("gopath")
    repo = path / "src" / _module_root()
    for package in ("clients/go", "examples/go"):
        (repo / package).parent.mkdir(parents=True, exist_ok=True)
        (repo / package).symlink_to(ROOT / package)
    return path


def _go(gopath: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # GOPATH mode: the sources Debian installed, no module proxy (unreachable).
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}{os.pathsep}{DEBIAN_GOPATH}",
        "GOPROXY": "off",
        "GOFLAGS": "",
        # go needs a build cache; $HOME may be unset under CI.
        "GOCACHE": os.environ.get("GOCACHE") or str(Path.home() / ".cache" / "go-build"),
    }
    assert GO is not None
    return subprocess.run(
        [GO, *args],
        cwd=gopath,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def go_demo(gopath: Path) -> Path:
    """examples/go built into a binary."""
    binary = gopath / "bin" / "keel-demo"
    built = _go(gopath, "build", "-o", str(binary), f"{_module_root()}/examples/go")
    assert built.returncode == 0, built.stderr
    return binary


def test_generated_go_stubs_and_example_build_and_vet(gopath: Path) -> None:
    packages = [f"{_module_root()}/clients/go/keel/v1", f"{_module_root()}/examples/go"]
    vetted = _go(gopath, "vet", *packages)
    assert vetted.returncode == 0, vetted.stderr
    gofmt = shutil.which("gofmt") or str(Path(GO or "go").with_name("gofmt"))
    listed = subprocess.run(
        [gofmt, "-l", str(ROOT / "clients" / "go"), str(ROOT / "examples" / "go")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.stdout == "", f"not gofmt-formatted: {listed.stdout}"


async def test_go_example_resumes_a_dropped_stream_with_every_event_once(
    go_demo: Path, redis_url: str, key_prefix: str
) -> None:
    await assert_demo_resumes(str(go_demo), redis_url=redis_url, key_prefix=key_prefix)
