"""The HTTP port's server: hypercorn (HTTP/1.1, and HTTP/2 in cleartext or over TLS) in the
server's own event loop.

The socket is bound here, before hypercorn starts, so port 0 is resolved
and a port in use fails at start-up like the gRPC port. stop() lets
requests in flight end for `grace_s` (streams end sooner: the server
drains them with UNAVAILABLE), then closes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from hypercorn.asyncio import serve
from hypercorn.config import Config

from server.web.routes import WebApplication

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, port: int, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.port = port
        self._task = task
        self._stop = stop

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            await self._task


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # the workers of one `serve --workers` share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def start_http(
    app: WebApplication,
    sock: socket.socket,
    *,
    grace_s: float,
    tls_cert_file: str = "",
    tls_key_file: str = "",
) -> HttpServer:
    """Serve `app` on `sock` (hypercorn takes it over) until HttpServer.stop()."""
    port: int = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn's socket owns the descriptor now
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = grace_s
    config.include_server_header = False
    if tls_cert_file:
        config.certfile = tls_cert_file
        config.keyfile = tls_key_file
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait, mode="asgi"))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # hypercorn takes the socket
    return HttpServer(port, task, stop)
