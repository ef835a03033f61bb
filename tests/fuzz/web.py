"""The HTTP port's part of the API fuzzer (test_api_fuzz.py's HTTP round): requests for the
port built from the fuzzer's strategies, a client that sends them with bounded reads, and
the verdict on each answer.

Three kinds of request:

- `message_requests`: a request message (what the gRPC round sends) over Connect binary,
  Connect JSON (its canonical JSON, or `json_mutants` of it) or gRPC-Web (binary, or JSON);
  streaming methods enveloped, as their protocol has them.
- `raw_requests`: what a browser, a proxy or a scanner might send: any route or none (paths
  percent-encoded, very long), any HTTP method, content types of every protocol and of none,
  bodies that are no message (raw_bodies, json_texts, JSON mutants, broken envelopes,
  oversized, gzip or not), odd protocol headers (timeouts, versions, compression), Origins
  allowed or not, header values that are not UTF-8.
- `sse_requests`: GET (or HEAD) /v1/runs/{run_id}/events with run ids that exist and
  garbage, percent-encoded, odd Last-Event-ID values, offsets, incarnations and queries.

`Web.exchange` sends one over HTTP/1.1 or HTTP/2 (cleartext, prior knowledge) and reads the
answer: a unary one whole (within UNARY_TIMEOUT_S), a stream (Connect, gRPC-Web, SSE) until
it ends, STREAM_WINDOW_S passes or MAX_STREAM_BYTES came, then the connection is closed.
`Answer.problems` says what no answer may be: a 5xx (501 and a 504 after a timeout header
aside), a Connect code internal/unknown/data_loss (grpc-status 2, 13 or 15 for gRPC-Web), an
error whose body is not Connect's JSON ({"code", "message"}), a 200 that does not decode as
the method's response, a stream or SSE body that does not frame.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx2
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from tests.fuzz.strategies import (
    json_mutants,
    json_texts,
    raw_bodies,
    strings,
    weighted,
)

UNARY_TIMEOUT_S = 20.0
STREAM_WINDOW_S = 0.25  # heartbeats come every 0.2 s: a live stream shows one or two
MAX_STREAM_BYTES = 256 * 1024
# hypercorn (h11) may answer a request whose request line and headers pass 16 KB itself
# (431, no body), or drop it, before the application sees it.
MAX_HEAD_BYTES = 16 * 1024
# The most a request may hold (KEEL_GRPC_MAX_RECEIVE_MESSAGE_BYTES's default): the server
# reads no more of a body it refuses (see Web.exchange).
MAX_BODY = 4 << 20
# gRPC's codes by number, named as Connect names them.
GRPC_NAMES = dict(
    enumerate(
        [
            "ok",
            "canceled",
            "unknown",
            "invalid_argument",
            "deadline_exceeded",
            "not_found",
            "already_exists",
            "permission_denied",
            "resource_exhausted",
            "failed_precondition",
            "aborted",
            "out_of_range",
            "unimplemented",
            "internal",
            "unavailable",
            "data_loss",
            "unauthenticated",
        ]
    )
)
CONNECT_CODES = frozenset(GRPC_NAMES.values()) - {"ok"}
BAD_CONNECT_CODES = frozenset({"internal", "unknown", "data_loss"})
SERVICE_PREFIX = "/keel.v1.AgentService/"
ALLOWED_ORIGIN = "https://allowed.example"  # the fuzzed server's KEEL_HTTP_CORS_ORIGINS


@dataclass(frozen=True, repr=False)
class HttpRequest:
    """One request for the HTTP port. `rpc` is the method its path names (to decode the
    answer); `kind` groups the counts ("connect-proto", "connect-json", "grpc-web",
    "raw", "sse")."""

    kind: str
    method: str
    path: str  # with the query, percent-encoded as sent
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    http2: bool = False
    rpc: MethodDescriptor | None = None

    def header(self, name: str) -> bytes | None:
        found = [v for k, v in self.headers if k.decode("latin-1").lower() == name]
        return found[-1] if found else None

    def head_bytes(self) -> int:
        return len(self.method) + len(self.path) + sum(len(k) + len(v) + 4 for k, v in self.headers)

    def __repr__(self) -> str:
        return f"HttpRequest({self.kind!r}: {self.show(300)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis prints this
        printer.text(repr(self))

    def show(self, limit: int = 1500) -> str:
        body = repr(self.body[:limit]) + (
            f"... ({len(self.body)} bytes)" if len(self.body) > limit else ""
        )
        path = (
            self.path if len(self.path) <= 300 else f"{self.path[:300]}... ({len(self.path)} chars)"
        )
        headers = [(k, v if len(v) <= 300 else v[:300] + b"...") for k, v in self.headers]
        version = "HTTP/2" if self.http2 else "HTTP/1.1"
        return f"{self.method} {path} {version}\nheaders: {headers}\nbody: {body}"


@dataclass
class Answer:
    status: int
    label: str  # for the counts: "200 ok", "400 invalid_argument", "200 open", ...
    problems: list[str] = field(default_factory=list)
    responses: list[Message] = field(default_factory=list)  # decoded, for the pools


# -- requests ------------------------------------------------------------------------


def envelope(payload: bytes, flags: int = 0) -> bytes:
    """A Connect streaming or gRPC-Web frame: a flags byte, the length, the payload."""
    return bytes([flags]) + len(payload).to_bytes(4, "big") + payload


def message_json(message: Message) -> Any:
    """`message` as protobuf's canonical JSON (json_format.MessageToDict); a value JSON
    cannot write (a Timestamp past year 9999, a FieldMask path with capitals) as the
    closest thing a client might send instead."""
    try:
        return json_format.MessageToDict(message)
    except Exception:
        pass
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.FieldMask":
        return ",".join(message.paths)  # type: ignore[attr-defined]
    if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return {"seconds": str(message.seconds), "nanos": message.nanos}  # type: ignore[attr-defined]
    document: dict[str, Any] = {}
    for descriptor, value in message.ListFields():
        alone = type(message)()
        alone.CopyFrom(message)
        for other, _ in alone.ListFields():
            if other.name != descriptor.name:
                alone.ClearField(other.name)
        try:
            document.update(json_format.MessageToDict(alone))
        except Exception:
            if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            if descriptor.message_type.GetOptions().map_entry:
                document[descriptor.json_name] = {str(k): message_json(v) for k, v in value.items()}
            elif descriptor.is_repeated:
                document[descriptor.json_name] = [message_json(item) for item in value]
            else:
                document[descriptor.json_name] = message_json(value)
    return document


def _rpc_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _protocol_request(
    kind: str, method: MethodDescriptor, body: bytes, http2: bool, *, codec: str
) -> HttpRequest:
    """`body` (a message's encoding, binary or JSON) as `kind`'s protocol sends it."""
    if kind == "grpc-web":
        content_type = f"application/grpc-web+{codec}"
        body = envelope(body)
        extra = [(b"x-grpc-web", b"1")]
    elif method.server_streaming:
        content_type = f"application/connect+{codec}"
        body = envelope(body)
        extra = [(b"connect-protocol-version", b"1")]
    else:
        content_type = f"application/{codec}"
        extra = [(b"connect-protocol-version", b"1")]
    headers = ((b"content-type", content_type.encode()), *extra)
    label = kind if kind == "grpc-web" else f"connect-{codec}"
    return HttpRequest(label, "POST", _rpc_path(method), headers, body, http2, method)


def message_requests(method: MethodDescriptor, message: Message) -> st.SearchStrategy[HttpRequest]:
    """`message` as the request of `method` over Connect (binary; JSON, canonical or
    mutated) or gRPC-Web (binary; JSON), over HTTP/1.1 or (one in four) HTTP/2."""
    binary = message.SerializeToString()
    document = message_json(message)

    @st.composite
    def build(draw: st.DrawFn) -> HttpRequest:
        kind = draw(st.sampled_from(["connect", "connect", "grpc-web"]))
        as_json = draw(st.integers(0, 4 if kind == "connect" else 2)) >= 2
        http2 = draw(st.integers(0, 3)) == 0
        if not as_json:
            return _protocol_request(kind, method, binary, http2, codec="proto")
        if draw(st.integers(0, 3)) == 0:  # the canonical JSON, proto field names or not
            names = draw(st.booleans())
            try:
                text = json_format.MessageToJson(message, preserving_proto_field_name=names)
            except Exception:
                text = json.dumps(document)
            body = text.encode()
        else:
            body = draw(json_mutants(document))
        return _protocol_request(kind, method, body, http2, codec="json")

    return build()


CONTENT_TYPES = [
    "application/json",
    "application/proto",
    "application/connect+json",
    "application/connect+proto",
    "application/grpc-web+proto",
    "application/grpc-web+json",
    "application/grpc-web",
    "application/grpc-web-text",
    "application/grpc",
    "application/grpc+proto",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-16",
    "APPLICATION/JSON",
    "application/proto; charset=utf-8",
    "application/",
    "application/connect+",
    "*/*",
    "",
]
HTTP_METHODS = ["POST"] * 6 + ["GET", "GET", "PUT", "OPTIONS", "OPTIONS", "DELETE", "PATCH"]
HTTP_METHODS += ["HEAD", "FUZZ"]
ODD_PATHS = [
    "/",
    "/console",
    "/console/",
    "/console/index.html",
    "/console/%2e%2e/%2e%2e/pyproject.toml",
    "/console/..%2f..%2fpyproject.toml",
    "/console/assets/",
    "/console/%00",
    "/v1/runs//events",
    "/v1/runs/x/events/",
    "/v1/runs/%2F/events",
    "/v1/runs",
    "/keel.v1.AgentService/",
    "/keel.v1.AgentService",
    "/keel.v1.AgentService/getRun",
    "/keel.v1.AgentService/GetRun/",
    "/keel.v1.AgentService/GetRun%2F",
    "/keel.v1.AgentService/%47etRun",
    "//keel.v1.AgentService/GetRun",
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/keel.v1.AgentService/Nope",
    "/%",
    "/%zz",
    "/%ff%fe",
    "/%c0%ae%c0%ae/",
]
TIMEOUTS = ["0", "1", "-1", "x", "", " 5", "5000", "9999999999", "99999999999"]
GRPC_TIMEOUTS = ["1S", "0n", "1m", "x", "99999999H", "100000000H", "1", "-1S"]
ENCODINGS = ["gzip", "identity", "br", "zstd", "x", "gzip, gzip", ""]


def _header_values() -> st.SearchStrategy[bytes]:
    """Header values an HTTP client can send: no CR, LF or NUL; any other byte, UTF-8 or not."""
    text = strings(oversized=False).map(
        lambda s: (
            s.encode().replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip(b" \t")
        )
    )
    return weighted(
        (3, text),
        (1, st.sampled_from([b"\xff", b"\xc0\x80", b"caf\xe9", b"\xed\xa0\x80", b"a" * 20_000])),
    )


def _broken_envelopes(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Connect and gRPC-Web framing gone wrong: odd flags (compressed without an encoding,
    end-of-stream first, trailers), a length that is not the payload's, a header cut short,
    two messages for a unary method, bytes after the last frame."""
    return weighted(
        (2, st.builds(envelope, payloads, st.sampled_from([0, 1, 2, 3, 0x80, 0x81, 0x7F, 0xFF]))),
        (
            2,
            st.builds(
                lambda p, delta: (
                    bytes([0]) + min(max(0, len(p) + delta), 2**32 - 1).to_bytes(4, "big") + p
                ),
                payloads,
                st.sampled_from([-1, 1, 100, 2**20, 2**31, 2**32]),
            ),
        ),
        (1, st.builds(lambda p, n: envelope(p)[:n], payloads, st.integers(0, 4))),
        (1, st.lists(payloads, min_size=2, max_size=3).map(lambda ps: b"".join(map(envelope, ps)))),
        (
            1,
            st.builds(
                lambda p, junk: envelope(p) + junk, payloads, st.binary(min_size=1, max_size=8)
            ),
        ),
        (1, st.sampled_from([b"\x02\x00\x00\x00\x02{}", b"\x00\x00\x00\x00\x00" * 3, b""])),
    )


def raw_requests(
    methods: list[MethodDescriptor],
    messages: dict[str, st.SearchStrategy[Message]],
    own_origin: str,
) -> st.SearchStrategy[HttpRequest]:
    """Requests nobody's client makes (see the module's docstring); `messages` are request
    messages of each method, for bodies made from them."""
    rpc_paths = [_rpc_path(m) for m in methods]
    quoted = strings(oversized=False).map(lambda s: quote(s, safe=""))
    paths = weighted(
        (8, st.sampled_from(rpc_paths)),
        (3, st.sampled_from(ODD_PATHS)),
        (1, quoted.map(lambda q: SERVICE_PREFIX + q)),
        (1, quoted.map(lambda q: "/" + q)),
        (1, st.sampled_from([1000, 8000, 17_000, 60_000]).map(lambda n: "/" + "a" * n)),
    )
    queries = weighted(
        (6, st.just("")),
        (1, quoted.map(lambda q: "?" + q)),
        (1, st.sampled_from(["?encoding=json&message=%7B%7D", "?connect=v1&base64=1&message=AA"])),
    )

    @st.composite
    def build(draw: st.DrawFn) -> HttpRequest:
        path = draw(paths) + draw(queries)
        method = draw(st.sampled_from(HTTP_METHODS))
        rpc = next((m for m in methods if path.split("?")[0] == _rpc_path(m)), None)
        some = rpc or draw(st.sampled_from(methods))
        message = messages[some.full_name]
        binary = message.map(lambda m: m.SerializeToString())
        as_json = message.map(lambda m: json.dumps(message_json(m)).encode())
        payloads = weighted(
            (2, binary),
            (1, as_json),
            (1, json_texts().map(str.encode)),
            (1, raw_bodies(some.input_type, message)),
        )
        body = draw(
            weighted(
                (3, raw_bodies(some.input_type, message)),
                (2, json_texts().map(str.encode)),
                (2, message.map(message_json).flatmap(json_mutants)),
                (3, _broken_envelopes(payloads)),
                (1, payloads),
                (1, st.just(b"")),
                (1, st.sampled_from([b"{}", b"[]", b"null", b"\x00"])),
            )
            if draw(st.integers(0, 60))
            else st.just(b"\x00" * (5 << 20))  # past the 4 MiB a request may be
        )
        headers: list[tuple[bytes, bytes]] = []
        content_type = draw(
            weighted(
                (8, st.sampled_from(CONTENT_TYPES)),
                (1, _header_values().map(lambda v: v.decode("latin-1"))),
                (2, st.none()),
            )
        )
        if content_type is not None:
            headers.append((b"content-type", content_type.encode("latin-1")))
        encoding = draw(st.one_of(st.none(), st.none(), st.sampled_from(ENCODINGS)))
        if encoding is not None:
            name = draw(
                st.sampled_from(["content-encoding", "connect-content-encoding", "grpc-encoding"])
            )
            headers.append((name.encode(), encoding.encode()))
            if encoding == "gzip" and draw(st.booleans()):
                body = gzip.compress(body, mtime=0)
        origin = draw(
            weighted(
                (8, st.none()),
                (1, st.sampled_from([ALLOWED_ORIGIN, own_origin])),
                (1, st.sampled_from(["https://evil.example", "null", "http://127.0.0.1", ""])),
                (1, _header_values().map(lambda v: v.decode("latin-1"))),
            )
        )
        if origin is not None:
            headers.append((b"origin", origin.encode("latin-1")))
            if method == "OPTIONS" and draw(st.integers(0, 3)):  # a preflight
                asked = draw(st.sampled_from(["POST", "GET", "PUT", "", "post"]))
                headers.append((b"access-control-request-method", asked.encode()))
                headers.append((b"access-control-request-headers", b"content-type, x-custom"))
        for _ in range(draw(st.integers(0, 3))):
            headers.append(
                draw(
                    st.one_of(
                        st.builds(
                            lambda v: (b"connect-protocol-version", v.encode()),
                            st.sampled_from(["1", "2", "", "01"]),
                        ),
                        st.builds(
                            lambda v: (b"connect-timeout-ms", v.encode()), st.sampled_from(TIMEOUTS)
                        ),
                        st.builds(
                            lambda v: (b"grpc-timeout", v.encode()), st.sampled_from(GRPC_TIMEOUTS)
                        ),
                        st.builds(
                            lambda v: (b"connect-accept-encoding", v.encode()),
                            st.sampled_from(ENCODINGS),
                        ),
                        st.builds(
                            lambda v: (b"accept-encoding", v.encode()), st.sampled_from(ENCODINGS)
                        ),
                        st.just((b"x-grpc-web", b"1")),
                        st.just((b"te", b"trailers")),
                        st.builds(lambda v: (b"authorization", b"Bearer " + v), _header_values()),
                        st.builds(lambda v: (b"x-fuzz", v), _header_values()),
                        st.builds(
                            lambda v: (b"accept", v.encode()),
                            st.sampled_from(["*/*", "text/event-stream", "application/json"]),
                        ),
                    )
                )
            )
        http2 = draw(st.integers(0, 3)) == 0
        headers = [(name, value.strip(b" \t")) for name, value in headers]  # as HTTP has them
        return HttpRequest("raw", method, path, tuple(headers), body, http2, rpc)

    return build()


def sse_requests(
    run_ids: st.SearchStrategy[str], incarnations: st.SearchStrategy[str]
) -> st.SearchStrategy[HttpRequest]:
    """GET /v1/runs/{run_id}/events: run ids that exist (`run_ids`) and garbage, percent-
    encoded; Last-Event-ID, ?offset= and ?incarnation= valid, at the edges and garbage."""
    numbers = weighted(
        (3, st.integers(-2, 60).map(str)),
        (
            1,
            st.sampled_from(
                [
                    "0",
                    " 1 ",
                    "01",
                    "1e3",
                    "1.0",
                    "+1",
                    "0x1",
                    str(10**18 - 1),
                    str(10**18),
                    str(2**63),
                    "9" * 19,
                    "",
                    "-0",
                    "\uff11",
                ]
            ),
        ),
        (1, strings(oversized=False)),
    )
    run = weighted(
        (6, run_ids.map(lambda r: quote(r, safe=""))),
        (2, strings(oversized=False).map(lambda s: quote(s, safe=""))),
        (
            1,
            st.sampled_from(
                [
                    "%",
                    "%zz",
                    "%2e%2e",
                    "..",
                    "a%00b",
                    "%25",
                    "a%2541",
                    "%2541",
                    "a" * 129,
                    "a" * 5000,
                    "a;b",
                    "a%3Fb",
                    "*",
                ]
            ),
        ),
    )

    @st.composite
    def build(draw: st.DrawFn) -> HttpRequest:
        path = f"/v1/runs/{draw(run)}/events"
        query: list[str] = []
        for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
            key = draw(
                weighted(
                    (3, st.sampled_from(["offset", "incarnation"])), (1, strings(oversized=False))
                )
            )
            value = draw(incarnations if key == "incarnation" else numbers)
            query.append(f"{quote(key, safe='')}={quote(value, safe='')}")
        if draw(st.integers(0, 9)) == 0:
            query.append(draw(st.sampled_from(["&&", "=", "offset", "offset=", "%", "a=%zz", ";"])))
        if query:
            path += "?" + "&".join(query)
        headers: list[tuple[bytes, bytes]] = []
        if draw(st.integers(0, 2)) == 0:
            value = draw(st.one_of(numbers.map(str.encode), _header_values()))
            headers.append((b"last-event-id", value.strip(b" \t")))
        if draw(st.booleans()):
            headers.append((b"accept", b"text/event-stream"))
        if draw(st.integers(0, 7)) == 0:
            headers.append(
                (
                    b"origin",
                    draw(st.sampled_from([ALLOWED_ORIGIN, "https://evil.example"])).encode(),
                )
            )
        method = "HEAD" if draw(st.integers(0, 11)) == 0 else "GET"
        return HttpRequest("sse", method, path, tuple(headers), b"", draw(st.integers(0, 3)) == 0)

    return build()


# -- sending and judging --------------------------------------------------------------


class Web:
    """HTTP/1.1 and HTTP/2 (prior knowledge) clients of the port."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self._timeout = httpx2.Timeout(UNARY_TIMEOUT_S, connect=5.0)
        self._http1 = httpx2.Client(timeout=self._timeout)
        self._http2 = httpx2.Client(timeout=self._timeout, http1=False, http2=True)

    def close(self) -> None:
        self._http1.close()
        self._http2.close()

    def exchange(self, request: HttpRequest) -> Answer:
        """Send `request`, read the answer (bounded), judge it. Raises TimeoutError for an
        answer that hangs.

        A body past MAX_BODY goes over HTTP/1.1 on a connection of its own, closed after
        it: the server answers without reading it all, and hypercorn then closes an HTTP/1.1
        connection (maybe while the body is being sent: fine), and drops an HTTP/2 one with
        every stream on it (docs/testing.md)."""
        large = len(request.body) > MAX_BODY
        client = (
            httpx2.Client(timeout=self._timeout)
            if large
            else self._http2
            if request.http2
            else self._http1
        )
        try:
            try:
                return self._exchange(client, request)
            except httpx2.RemoteProtocolError as exc:
                # hypercorn ends an HTTP/2 connection after 1,000 requests (GOAWAY, no
                # error): one it did not take is sent again, on a new connection.
                if "ConnectionTerminated error_code:0" not in str(exc):
                    raise
                return self._exchange(client, request)
        except (httpx2.LocalProtocolError, httpx2.InvalidURL):  # the client's own refusal
            return Answer(0, "not sent (the client refused it)")
        except (httpx2.WriteError, httpx2.RemoteProtocolError, httpx2.WriteTimeout) as exc:
            if large:  # the server stopped reading it (and closed the connection)
                return Answer(0, "closed while sending")
            if isinstance(exc, httpx2.WriteTimeout):
                raise TimeoutError(f"the body could not be sent: {exc!r}") from exc
            # Only hypercorn drops a connection, for a request it refuses before the
            # application: a head past its limit.
            if request.head_bytes() > MAX_HEAD_BYTES:
                return Answer(0, "dropped (head too large)")
            return Answer(0, "dropped", [f"the server dropped the connection: {exc!r}"])
        except httpx2.TimeoutException as exc:
            raise TimeoutError(f"no answer within {UNARY_TIMEOUT_S} s: {exc!r}") from exc
        finally:
            if large:
                client.close()

    def _exchange(self, client: httpx2.Client, request: HttpRequest) -> Answer:
        started = time.monotonic()
        built = client.build_request(
            request.method,
            self.base + request.path,
            headers=list(request.headers),
            content=request.body,
        )
        response = client.send(built, stream=True)
        try:
            data = b""
            ended = True
            if _is_stream(response):
                ended = False
                for chunk in response.iter_bytes():
                    data += chunk
                    if time.monotonic() - started > STREAM_WINDOW_S or len(data) > MAX_STREAM_BYTES:
                        break
                else:
                    ended = True
            elif request.method != "HEAD":
                data = response.read()
            return judge(request, response.status_code, response.headers, data, ended)
        finally:
            response.close()


def _is_stream(response: httpx2.Response) -> bool:
    content_type = response.headers.get("content-type", "").lower()
    return content_type.startswith(
        ("application/connect+", "application/grpc", "text/event-stream")
    )


def _error_body(data: bytes, where: str) -> tuple[str, list[str]]:
    """The code of a Connect error body, and what is wrong with it."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return "-", [f"{where} is not JSON: {data[:300]!r}"]
    if not isinstance(body, dict):
        return "-", [f"{where} is not a JSON object: {data[:300]!r}"]
    code, message = body.get("code"), body.get("message")
    problems = []
    if code not in CONNECT_CODES:
        problems.append(f"{where} has no Connect code: {data[:300]!r}")
    elif code in BAD_CONNECT_CODES:
        problems.append(f"{where} has code {code}: {data[:1000]!r}")
    if not isinstance(message, str):
        problems.append(f"{where} has no message: {data[:300]!r}")
    return str(code), problems


def judge(
    request: HttpRequest, status: int, headers: httpx2.Headers, data: bytes, ended: bool
) -> Answer:
    """What is wrong with an answer (see the module's docstring)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    timed = (
        request.header("connect-timeout-ms") is not None
        or request.header("grpc-timeout") is not None
    )
    answer = Answer(status, str(status))
    if status >= 500 and status != 501 and not (status == 504 and timed):
        answer.problems.append(f"HTTP {status}")
    if request.method == "HEAD":
        answer.label = f"{status} (HEAD)"
    if status >= 400:
        if request.method == "HEAD":
            return answer
        if status == 431 and not data and request.head_bytes() > MAX_HEAD_BYTES:
            answer.label = "431 (hypercorn: head too large)"
            return answer
        if content_type != "application/json":
            answer.problems.append(f"an error with content type {content_type!r}")
        code, problems = _error_body(data, f"the HTTP {status} body")
        answer.label = f"{status} {code}"
        answer.problems += problems
        return answer
    if status != 200 or request.method == "HEAD":
        return answer
    output = GetMessageClass(request.rpc.output_type) if request.rpc is not None else None
    if content_type in ("application/proto", "application/json"):
        answer.label = "200 ok"
        if output is not None:
            _decode(answer, output, content_type.endswith("json"), data, gzip=False)
    elif content_type.startswith(("application/connect+", "application/grpc")):
        _frames(answer, request, content_type, headers, data, ended, output)
    elif content_type == "text/event-stream":
        _events(answer, data, ended)
    else:
        answer.label = f"200 {content_type or 'no content type'}"
    return answer


def _decode(answer: Answer, output: Any, as_json: bool, data: bytes, *, gzip: bool) -> None:
    try:
        if gzip:
            data = _gunzip(data)
        if as_json:
            answer.responses.append(json_format.Parse(data, output(), ignore_unknown_fields=True))
        else:
            answer.responses.append(output.FromString(data))
    except Exception as exc:
        answer.problems.append(f"a 200 answer's message does not decode: {exc!r}: {data[:300]!r}")


def _gunzip(data: bytes) -> bytes:
    return gzip.decompress(data)


def _frames(
    answer: Answer,
    request: HttpRequest,
    content_type: str,
    headers: httpx2.Headers,
    data: bytes,
    ended: bool,
    output: Any,
) -> None:
    """A Connect stream's or gRPC-Web answer: its messages and its status."""
    grpc = content_type.startswith("application/grpc")
    as_json = content_type.endswith("json")
    at = 0
    status = ""
    while at + 5 <= len(data):
        flags, size = data[at], int.from_bytes(data[at + 1 : at + 5], "big")
        if at + 5 + size > len(data):
            break
        payload = data[at + 5 : at + 5 + size]
        at += 5 + size
        if grpc and flags & 0x80:
            status = _grpc_trailers(answer, payload)
        elif not grpc and flags & 0x02:
            status = _end_stream(answer, payload)
        elif output is not None:
            _decode(answer, output, as_json, payload, gzip=bool(flags & 0x01))
    if grpc and not status and "grpc-status" in headers:  # trailers-only
        status = _grpc_status(answer, headers["grpc-status"])
    if status:
        answer.label = f"200 {status}"
        if at != len(data):
            answer.problems.append(f"{len(data) - at} bytes after the status frame")
    elif ended and not (grpc and request.http2):  # gRPC over HTTP/2: its trailers are not read here
        answer.problems.append(f"a stream ended without its status: {data[:300]!r}")
    else:
        answer.label = "200 open" if not ended else "200 (trailers not read)"


def _end_stream(answer: Answer, payload: bytes) -> str:
    try:
        body = json.loads(payload)
    except ValueError:
        answer.problems.append(f"an end-of-stream message that is not JSON: {payload[:300]!r}")
        return "-"
    error = body.get("error") if isinstance(body, dict) else None
    if error is None:
        return "ok"
    code, problems = _error_body(json.dumps(error).encode(), "an end-of-stream error")
    answer.problems += problems
    return code


def _grpc_trailers(answer: Answer, payload: bytes) -> str:
    fields = dict(
        line.split(":", 1) for line in payload.decode("latin-1").split("\r\n") if ":" in line
    )
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    if "grpc-status" not in fields:
        answer.problems.append(f"gRPC-Web trailers without grpc-status: {payload[:300]!r}")
        return "-"
    return _grpc_status(answer, fields["grpc-status"])


def _grpc_status(answer: Answer, value: str) -> str:
    try:
        name = GRPC_NAMES[int(value)]
    except (ValueError, KeyError):
        answer.problems.append(f"grpc-status {value!r}")
        return "-"
    if name in BAD_CONNECT_CODES:
        answer.problems.append(f"grpc-status {value} ({name})")
    return f"grpc {name}"


def _events(answer: Answer, data: bytes, ended: bool) -> None:
    """An SSE answer: a snapshot, then events with ids in order, heartbeats, maybe an error."""
    text = data.decode("utf-8", errors="replace")
    blocks = text.split("\n\n")
    if not ended:
        blocks = blocks[:-1]  # the last may be cut
    elif blocks and blocks[-1] == "":
        blocks = blocks[:-1]
    last = -1
    for n, block in enumerate(blocks):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields[name or "comment"] = value.removeprefix(" ")
        if n == 0 and fields.get("event") != "snapshot":
            answer.problems.append(
                f"an event stream that does not start with its snapshot: {block[:300]!r}"
            )
        if "data" in fields:
            try:
                json.loads(fields["data"])
            except ValueError:
                answer.problems.append(f"an event whose data is not JSON: {block[:300]!r}")
        if fields.get("event") == "error":
            code, problems = _error_body(fields.get("data", "").encode(), "an SSE error event")
            answer.problems += problems
            answer.label = f"200 sse error {code}"
        if "id" in fields:
            if not fields["id"].isdigit() or int(fields["id"]) <= last:
                answer.problems.append(f"event ids out of order: {fields['id']!r} after {last}")
            else:
                last = int(fields["id"])
    if not answer.label.startswith("200 sse error"):
        answer.label = "200 sse" if ended else "200 sse open"
