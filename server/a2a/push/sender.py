"""Sending one push notification, and which URLs may receive them.

A notification is an HTTP POST of A2A's StreamResponse as JSON (`{"task": {...}}`, the
task as it is when sent), with the config's token in X-A2A-Notification-Token and its
credentials, if any, in Authorization: what the a2a-sdk's own sender posts. A 2xx answer
acknowledges it; anything else, or no answer within the timeout, is a failed attempt.
Redirects are not followed (a redirect could lead to an address the check refused).

Targets: http(s) only, and by default only public addresses: a host that resolves to a
loopback, private, link-local (cloud metadata), shared or reserved address is refused
(the a2a-sdk's validate_push_notification_url), when the config is made and again
before each delivery, as DNS can change. `allow_private` lifts the address check, for
receivers on the operator's own network (and tests).
"""

from __future__ import annotations

import urllib.parse

import httpx
from a2a.types import a2a_pb2 as a2a
from a2a.utils.push_url_validator import validate_push_notification_url
from google.protobuf import json_format

from server.a2a.push.store import PushConfig

TOKEN_HEADER = "X-A2A-Notification-Token"
MAX_URL_CHARS = 2048


async def url_problem(url: str, *, allow_private: bool) -> str:
    """Why `url` may not receive notifications, or "" when it may."""
    if len(url) > MAX_URL_CHARS:
        return f"the url is longer than {MAX_URL_CHARS} characters"
    try:
        parsed = urllib.parse.urlparse(url)
        parsed.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return "the url cannot be parsed"
    if parsed.scheme not in ("http", "https"):
        return "the url must be http:// or https://"
    if not parsed.hostname:
        return "the url has no host"
    if allow_private:
        return ""
    if not await validate_push_notification_url(url):
        return (
            f"the host {parsed.hostname!r} does not resolve to public addresses only (a "
            "loopback, private, link-local or reserved address is refused unless "
            "KEEL_A2A_PUSH_ALLOW_PRIVATE is set)"
        )
    return ""


class Sender:
    """POSTs notifications with one pooled HTTP client; `close()` it."""

    def __init__(self, *, timeout_s: float, allow_private: bool) -> None:
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._allow_private = allow_private

    async def send(self, config: PushConfig, task: a2a.Task) -> str:
        """Deliver `task` to `config`: "" when acknowledged, else what went wrong."""
        problem = await url_problem(config.url, allow_private=self._allow_private)
        if problem:
            return problem
        headers = {"Content-Type": "application/json"}
        if config.token:
            headers[TOKEN_HEADER] = config.token
        if config.auth_scheme and config.auth_credentials:
            headers["Authorization"] = f"{config.auth_scheme} {config.auth_credentials}"
        body = json_format.MessageToJson(a2a.StreamResponse(task=task), indent=None)
        try:
            response = await self._client.post(config.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        if not 200 <= response.status_code < 300:
            return f"HTTP {response.status_code}"
        return ""

    async def close(self) -> None:
        await self._client.aclose()
