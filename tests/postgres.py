"""A real PostgreSQL 15 for the tests: Debian's server binaries, started on a free port.

initdb and pg_ctl refuse to run as root, so when the tests run as root the
cluster belongs to the `postgres` user (Debian's package creates it) and its
commands run through `runuser`. The data directory is a fresh temporary
directory owned by that user; the server listens on 127.0.0.1 and on a Unix
socket in the same directory, without fsync (nothing here must survive a
crash of the machine). Authentication is `trust`: the URL needs no password.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("KEEL_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_owner(args: list[str]) -> list[str]:
    """`args` run as the unprivileged `postgres` user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


@dataclass
class PostgresServer:
    """A running PostgreSQL server of the test session."""

    datadir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run(
            _as_owner([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb a fresh cluster in a temporary directory and start it on a free port."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"PostgreSQL server binaries not found in {PG_BIN}")
    root = Path(tempfile.mkdtemp(prefix="keel-pg-"))
    datadir = root / "data"
    datadir.mkdir()
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (root, datadir):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    os.chmod(root, 0o755)
    subprocess.run(
        _as_owner([str(PG_BIN / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres"]),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last_error = b""
    for _attempt in range(3):  # the free port may be taken before the server binds it
        port = _free_port()
        options = (
            f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=400"
        )
        started = subprocess.run(
            _as_owner(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(datadir),
                    "-o",
                    options,
                    "-l",
                    str(datadir / "server.log"),
                    "-t",
                    str(START_TIMEOUT_S),
                    "-w",
                    "start",
                ]
            ),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if started.returncode == 0:
            return PostgresServer(datadir, port)
        last_error = started.stderr
        time.sleep(0.2)
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"could not start PostgreSQL: {last_error.decode(errors='replace')}")
