"""The console's built files (console/dist, made by `npm run build --prefix console`) at /console/.

Files are read from the directory as they are asked for (the build is a few
small files; the OS caches them). Only files under the directory are served:
a path that leaves it, or names a directory, is not found. Assets carry a
content hash in their names, so they may be cached for good; index.html is
revalidated, so a new build is seen at once.
"""

from __future__ import annotations

import asyncio
import mimetypes
from http import HTTPStatus
from pathlib import Path

from google.rpc import code_pb2

from server.web.asgi import Headers, Send, respond, respond_problem
from server.web.errors import http_problem

PREFIX = "/console"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "console" / "dist"
_IMMUTABLE = b"public, max-age=31536000, immutable"


class Console:
    def __init__(self, directory: Path) -> None:
        self._root = directory.resolve()

    def file(self, path: str) -> Path | None:
        """The file a request path under /console names, if it exists and is under the root."""
        # ASGI paths come percent-decoded: decoding again would read %2561 as "a".
        relative = path[len(PREFIX) :].lstrip("/") or "index.html"
        candidate = (self._root / relative).resolve()
        if not candidate.is_relative_to(self._root) or not candidate.is_file():
            return None
        return candidate

    async def serve(self, path: str, send: Send, *, head: bool = False) -> None:
        file = self.file(path)
        if file is None:
            missing = (
                f"no console file {path[:200]!r}"
                if (self._root / "index.html").is_file()
                else f"the console is not built in {self._root} (npm run build --prefix console)"
            )
            await respond_problem(
                send, http_problem(HTTPStatus.NOT_FOUND, code_pb2.NOT_FOUND, missing, "NOT_FOUND")
            )
            return
        body = b"" if head else await asyncio.to_thread(file.read_bytes)
        content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type == "application/javascript":
            content_type += "; charset=utf-8"
        cache = _IMMUTABLE if "/assets/" in file.as_posix() else b"no-cache"
        headers: Headers = [(b"cache-control", cache), (b"x-content-type-options", b"nosniff")]
        await respond(send, 200, body, headers, content_type)
