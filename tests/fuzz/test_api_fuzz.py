"""Fuzzing the API: every RPC of every keel.v1 service (found in the generated modules'
descriptors, so a new RPC is fuzzed without a test edit), against one real server, with
requests Hypothesis derives from the proto descriptors (tests/fuzz/strategies.py).

Each method gets (a) messages of its request type: wild ones (oversized and malformed
strings, integers at their extremes, enum numbers the proto does not define, odd
timestamps, durations and field masks), plausible ones, and mutants of requests that
worked (the seeds below, the answers' next pages, what the server answered OK so far)
with a field or two changed; with values that reach past the first checks: ids of runs,
threads, tasks and schedules that exist, scripts for the scripted agent, JSON that parsers
choke on, page tokens the server issued and forgeries of them; and (b) raw bytes as its
request body, mostly not a valid encoding (random, truncated, wrong wire types, bad UTF-8,
nesting past the parser's limit).

The server serves its HTTP port too; the HTTP round (test_http_*, tests/fuzz/web.py) sends
it HTTP_SHARE as many requests again: the same request messages over Connect (binary, JSON
and JSON mutated) and gRPC-Web, raw requests (any route, HTTP method, content type, body,
framing, protocol header, Origin), and SSE requests for runs that exist and not, with
resume points valid and not. Every answer there must be a status a client can act on (no
5xx, no internal/unknown/data_loss), every error body Connect's JSON, every 200 decodable;
nothing may hang, the server may log no exception.

Every answer must be a status a client can act on: never INTERNAL, UNKNOWN or DATA_LOSS,
and no call may hang (a unary call gets UNARY_TIMEOUT_S; a stream is read for
STREAM_WINDOW_S or MAX_STREAM_MESSAGES and then cancelled: one still open is fine, one
silent for STREAM_TIMEOUT_S, though heartbeats come every HEARTBEAT_S, hangs). The server
is a `python -m server serve` process (Redis; KEEL_FUZZ_BACKEND=memory for the in-memory
log); it must never exit, and after the fuzzing its health is SERVING, a normal run
streams to its finish (over gRPC, and over Connect) and its log has no "internal error".

Modes:
- CI (the default): CI_REQUESTS requests in all, derandomized (the same choices every
  time; the ids they pick among are the server's).
- Long: KEEL_FUZZ_REQUESTS=10000 (or any count) .venv/bin/python -m pytest tests/fuzz -q -s,
  or `scripts/fuzz [COUNT]`; random each time, in rounds of ROUND requests so that each
  round mutates what worked in the ones before.

The requests are shared out evenly among the methods, three quarters generated messages
and one quarter raw bytes (a method with fewer distinct requests, like ListAgents, leaves
its share to the next). With -s the module prints how many requests it sent and the
status codes they got, in all and per method.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import select
import subprocess
import sys
import threading
import time
import uuid
import zoneinfo
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import keel.v1
import pyqwest
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel.v1.agent_service_connect import AgentServiceClientSync

from server.process import HTTP_LISTENING, LISTENING
from tests.fuzz.strategies import (
    Messages,
    json_texts,
    json_values,
    perturbed,
    raw_bodies,
    strings,
    tokens_of,
    weighted,
)
from tests.fuzz.web import (
    ALLOWED_ORIGIN,
    Answer,
    HttpRequest,
    Web,
    message_requests,
    raw_requests,
    sse_requests,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTED = "server.agents.testing:registry"
CI_REQUESTS = 600
REQUESTS = int(os.environ.get("KEEL_FUZZ_REQUESTS") or CI_REQUESTS)
LONG = bool(os.environ.get("KEEL_FUZZ_REQUESTS"))
BACKEND = os.environ.get("KEEL_FUZZ_BACKEND", "redis")
RAW_SHARE = 0.25  # of each method's requests: raw bytes as its body
ROUND = 100  # long mode: requests per Hypothesis run (see _rounds)
# The HTTP round (tests/fuzz/web.py) sends HTTP_SHARE as many requests again to the HTTP
# port: half request messages over Connect and gRPC-Web, the rest raw requests and SSE.
HTTP_SHARE = 0.5
HTTP_REQUESTS = round(REQUESTS * HTTP_SHARE)
HTTP_MESSAGES_SHARE, HTTP_RAW_SHARE = 0.5, 0.3  # of HTTP_REQUESTS; SSE gets the rest

UNARY_TIMEOUT_S = 20.0  # no unary call takes more than CancelRun's wait (10 s) for a run
STREAM_WINDOW_S = 0.5  # how long a stream is read before it is cancelled
MAX_STREAM_MESSAGES = 50
STREAM_TIMEOUT_S = 20.0  # heartbeats come every HEARTBEAT_S: a silent stream hangs
HEARTBEAT_S = 0.2
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
POOL_SIZE = 64


def keel_methods() -> list[MethodDescriptor]:
    """Every method of every service in the keel.v1 package's generated modules."""
    methods: list[MethodDescriptor] = []
    for info in sorted(pkgutil.iter_modules(keel.v1.__path__), key=lambda i: i.name):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"keel.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(service.methods)
    return methods


SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"]  # the one the seeds call
# Methods that remove what others name (Delete*, Cancel*) go last, so the others meet it.
METHODS = sorted(keel_methods(), key=lambda m: m.name.startswith(("Delete", "Cancel")))


def _shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts as even as can be (each at least 1)."""
    base, extra = divmod(total, parts)
    return [max(1, base + (1 if n < extra else 0)) for n in range(parts)]


_RAW_TOTAL = round(REQUESTS * RAW_SHARE)
GENERATED = dict(
    zip((m.full_name for m in METHODS), _shares(REQUESTS - _RAW_TOTAL, len(METHODS)), strict=True)
)
RAW = dict(zip((m.full_name for m in METHODS), _shares(_RAW_TOTAL, len(METHODS)), strict=True))
# The HTTP port serves AgentService only.
HTTP_METHODS = [m for m in METHODS if m.containing_service.full_name == SERVICE.full_name]
HTTP_MESSAGES = dict(
    zip(
        (m.full_name for m in HTTP_METHODS),
        _shares(round(HTTP_REQUESTS * HTTP_MESSAGES_SHARE), len(HTTP_METHODS)),
        strict=True,
    )
)
HTTP_RAW = max(1, round(HTTP_REQUESTS * HTTP_RAW_SHARE))
HTTP_SSE = max(1, HTTP_REQUESTS - sum(HTTP_MESSAGES.values()) - HTTP_RAW)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not LONG,
        print_blob=LONG,
        suppress_health_check=list(HealthCheck),
    )


def _rounds(examples: int) -> list[int]:
    """The Hypothesis runs a test makes: in long mode ROUND examples each, every one with
    the requests that worked so far as its corpus; in CI one (derandomized) run."""
    if not LONG:
        return [examples]
    full, rest = divmod(examples, ROUND)
    return [ROUND] * full + ([rest] if rest else [])


def _timeout_for(examples: int) -> float:
    """pytest-timeout's bound for a test sending `examples` requests (streams take longest)."""
    return 120.0 + examples * (STREAM_WINDOW_S + 0.5)


# -- the server ----------------------------------------------------------------------


@dataclass
class Server:
    """A `python -m server serve` process, its gRPC and HTTP ports; its log (WARNING and
    up) goes to `log_path`."""

    process: subprocess.Popen[bytes]
    port: int
    http_port: int
    log_path: Path

    def assert_alive(self) -> None:
        code = self.process.poll()
        assert code is None, f"the server exited with {code}:\n{self.log_tail()}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(redis_url: str, log_path: Path) -> Server:
    env = {
        **os.environ,
        "KEEL_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        "KEEL_TASKS_RETRY_BACKOFF_S": "0.05",
        "KEEL_TASKS_RETRY_BACKOFF_MAX_S": "0.2",
        "KEEL_HTTP_CORS_ORIGINS": ALLOWED_ORIGIN,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "server", "serve", "--port", "0", "--http-port", "0"),
                *("--redis-url", redis_url, "--key-prefix", f"fuzz-{uuid.uuid4().hex[:12]}"),
                *("--agents", SCRIPTED, "--log-level", "WARNING", "--log-format", "text"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    line = b""
    http_port = 0
    while time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline()
            if line.decode().startswith(HTTP_LISTENING):
                http_port = int(line.decode().rsplit(":", 1)[1])
                # The gRPC port's line follows at once (and may be read into the buffer
                # already, where select() does not see it).
                line = process.stdout.readline()
            if line.decode().startswith(LISTENING) and http_port:
                # Anything it prints later goes to its log (a full pipe would block it).
                threading.Thread(target=_copy, args=(process.stdout, log_path), daemon=True).start()
                port = int(line.decode().rsplit(":", 1)[1])
                return Server(process, port, http_port, log_path)
    process.kill()
    process.wait()
    raise RuntimeError(f"keel did not start: {line!r}\n{log_path.read_text(errors='replace')}")


def _copy(source: IO[bytes], path: Path) -> None:
    with path.open("ab") as log:
        for line in source:
            log.write(line)


# -- what the fuzzer learns from answers ---------------------------------------------


class Pools:
    """What the fuzzer learned from the server: values seen in its answers (ids, request
    ids, page tokens), by kind, for hints to draw from, so requests name things that
    exist; and, by method, requests that it answered OK, for mutants to start from."""

    def __init__(self) -> None:
        self._values: dict[str, list[str]] = defaultdict(list)
        self._requests: dict[str, list[bytes]] = defaultdict(list)

    def add(self, kind: str, value: str) -> None:
        values = self._values[kind]
        if value and value not in values:
            values.append(value)
            del values[:-POOL_SIZE]

    def pick(self, kind: str, n: int) -> str:
        values = self._values.get(kind)
        return values[n % len(values)] if values else ""

    def draw(self, kind: str) -> st.SearchStrategy[str]:
        """One of the values of `kind` at the time of drawing ("" while there is none)."""
        return st.integers(0, POOL_SIZE - 1).map(lambda n: self.pick(kind, n))

    def add_request(self, method: str, body: bytes) -> None:
        requests = self._requests[method]
        if body not in requests:
            requests.append(body)
            del requests[:-POOL_SIZE]

    def remember(
        self, method: MethodDescriptor, body: bytes, response: Message | None = None
    ) -> None:
        """Keep a request that worked, for mutants, and the request of its next page."""
        self.add_request(method.name, body)
        token = getattr(response, "next_page_token", "")
        if token and "page_token" in method.input_type.fields_by_name:
            follow = GetMessageClass(method.input_type).FromString(body)
            follow.page_token = token  # type: ignore[attr-defined]
            self.add_request(method.name, follow.SerializeToString())

    def requests(self, method: str) -> list[bytes]:
        """The requests of `method` that worked, as they are now."""
        return list(self._requests.get(method, ()))

    def harvest(self, method: str, message: Message) -> None:
        """Keep the ids and tokens an answer holds (in any nested message)."""
        for descriptor, value in message.ListFields():
            items = list(value) if descriptor.is_repeated else [value]
            if descriptor.type == descriptor.TYPE_MESSAGE:
                if not descriptor.message_type.GetOptions().map_entry:
                    for item in items:
                        self.harvest(method, item)
            elif descriptor.type == descriptor.TYPE_STRING:
                kind = _pool_kind(descriptor.name, method)
                for text in items if kind else ():
                    self.add(kind, text)


def _pool_kind(field: str, method: str) -> str:
    """The pool of a string field of an answer ("": none)."""
    if field == "next_page_token":
        return f"token:{method}"
    if field.endswith(("run_id", "run_ids")):
        return "run_id"
    kinds = ("thread_id", "task_id", "schedule_id", "tool_call_id", "resource_id", "request_id")
    kinds += ("incarnation",)
    return field if field in kinds else ""


# -- hints: values that reach past the first checks ---------------------------------


def _ids(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True)


RUN_IDS = _ids(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}")
THREAD_IDS = _ids(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,70}")
HEX16 = _ids(r"[0-9a-f]{16}")


def scripts() -> st.SearchStrategy[str]:
    """Inputs of the scripted agent (server/agents/testing.py): short valid scripts, and
    steps it should reject."""
    keys = st.sampled_from(["k", "k2", "é", "{x}"])
    tool_steps = st.one_of(
        st.builds(lambda k: {"tool": "record", "args": {"key": k}}, keys),
        st.just({"tool": "approve_me", "args": {"action": "deploy"}}),
        st.builds(lambda m: {"tool": "fail", "args": {"message": m}}, st.text(max_size=10)),
        st.builds(
            lambda tool, k, ms, fails: {
                "tool": tool,
                "args": {"key": k, "duration_ms": ms, "fail_times": fails},
            },
            st.sampled_from(["slow", "slow_reject"]),
            keys,
            st.integers(0, 300),
            st.integers(0, 2),
        ),
    )
    steps = weighted(
        (
            3,
            st.builds(
                lambda n, ms: {"text": n, "delay_ms": ms}, st.integers(0, 20), st.integers(0, 5)
            ),
        ),
        (3, tool_steps),
        (1, st.lists(tool_steps, min_size=1, max_size=3).map(lambda ts: {"parallel": ts})),
        (1, st.builds(lambda m: {"error": m}, st.text(max_size=10))),
        (1, st.just({"echo_history": True})),
        (
            1,
            st.dictionaries(
                st.sampled_from(["text", "tool", "args", "delay_ms", "x"]),
                json_values(),
                max_size=3,
            ),
        ),
    )
    return st.builds(
        lambda s, satisfy: json.dumps(
            {"steps": s, **({} if satisfy is None else {"satisfy_on": satisfy})}
        ),
        st.lists(steps, max_size=4),
        weighted((3, st.none()), (1, st.integers(-1, 4))),
    )


def forged_tokens(pools: Pools, method: str) -> st.SearchStrategy[str]:
    """Tokens the server issued to `method`, as issued and with a value of their body
    changed (the filters' digest mostly kept, so the server reads the forged body)."""
    issued = pools.draw(f"token:{method}")
    return weighted(
        (1, issued),
        (3, issued.flatmap(perturbed)),
        (1, tokens_of(st.dictionaries(st.sampled_from(["t", "r", "i", "s", "f"]), json_values(4)))),
    )


CRON_FIELDS = ["*", "0", "59", "60", "*/5", "*/0", "1-5", "5-1", "MON", "JAN", "L", "W", "15W"]
CRON_FIELDS += ["5#3", "?", "-1", "9" * 20, "1,2,3", "*/99999999999", "0-59/7", "H", "", "\x00"]
VALID_CRONS = ["0 0 1 1 *", "*/5 * * * *", "0 * * * *", "@hourly", "@yearly", "* * * * * *"]
ODD_CRONS = ["@reboot", "@HOURLY", "@", "0 0 30 2 *", "0 0 31 4 *", "* * * * * * *"]
ODD_ZONES = ["", "UTC", "Europe", "America", "Etc", "posix", "right", "localtime", "../UTC"]
ODD_ZONES += ["/UTC", "UTC/", "Etc/GMT+15", "a" * 300, "Europe/" + "x" * 300]


def crons() -> st.SearchStrategy[str]:
    return weighted(
        (4, st.sampled_from(VALID_CRONS)),
        (3, st.lists(st.sampled_from(CRON_FIELDS), min_size=4, max_size=7).map(" ".join)),
        (1, st.sampled_from(ODD_CRONS)),
    )


def timezones() -> st.SearchStrategy[str]:
    return weighted(
        (4, st.sampled_from(sorted(zoneinfo.available_timezones()))),
        (1, st.sampled_from(ODD_ZONES)),
    )


def hints(pools: Pools, agents: list[str]) -> dict[str, st.SearchStrategy[Any]]:
    run_ids = weighted((3, pools.draw("run_id")), (1, RUN_IDS))
    found: dict[str, st.SearchStrategy[Any]] = {
        "run_id": run_ids,
        "thread_id": weighted((3, pools.draw("thread_id")), (1, THREAD_IDS)),
        "schedule_id": weighted((3, pools.draw("schedule_id")), (1, THREAD_IDS)),
        "task_id": weighted(
            (3, pools.draw("task_id")),
            (1, st.builds(lambda run, hex_: f"{run}.{hex_}", run_ids, HEX16)),
        ),
        "request_id": weighted((1, pools.draw("request_id")), (2, RUN_IDS)),
        "resource_id": weighted((1, pools.draw("resource_id")), (1, st.text(max_size=20))),
        "tool_call_id": weighted(
            (2, pools.draw("tool_call_id")), (1, st.sampled_from(["call_0", "call_1", "x"]))
        ),
        "agent_id": weighted((4, st.just("scripted")), (1, st.sampled_from(agents))),
        "judge_agent_id": weighted((3, st.just("scripted-judge")), (1, st.sampled_from(agents))),
        "input": weighted((3, scripts()), (1, json_texts())),
        "objective": weighted(
            (3, st.sampled_from(["say DONE", "é ☃", "x" * 1000])), (1, strings())
        ),
        "max_attempts": st.integers(-2, 12),
        "page_size": st.integers(-2, 3),
        "offset": st.integers(-2, 60),
        "tenant": st.sampled_from(["", "*", "other", "{t}", " ", "\x00"]),
        "cron": crons(),
        "timezone": timezones(),
        "paused": weighted((3, st.just(True)), (1, st.just(False))),
        "result_json": json_texts(),
        "override_args_json": json_texts(),
        "reason": strings(oversized=False),
        "incarnation": weighted((2, pools.draw("incarnation")), (1, strings(oversized=False))),
    }
    for method in METHODS:
        page_token = method.input_type.fields_by_name.get("page_token")
        if page_token is not None:
            found[page_token.full_name] = forged_tokens(pools, method.name)
    return found


# -- sending -------------------------------------------------------------------------


@dataclass
class Fuzz:
    """The server, a channel and HTTP clients to it, what was learned, and what every
    request got."""

    server: Server
    channel: grpc.Channel
    web: Web
    pools: Pools
    messages: Messages
    codes: Counter[str] = field(default_factory=Counter)
    by_method: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    http_codes: Counter[str] = field(default_factory=Counter)
    http_by_kind: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    http_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    owed: int = 0  # requests a test could not send (too few distinct ones): the next sends them
    http_owed: int = 0  # the same, of the HTTP round
    log_read: int = 0  # how much of the server's log check_http has read
    logged: list[str] = field(default_factory=list)  # errors the server logged, and after what

    def requests(self, method: MethodDescriptor) -> st.SearchStrategy[Message]:
        """Requests of `method`: wild, plausible, and mutants of ones that worked so far."""
        corpus = self.pools.requests(method.name)
        return weighted(
            (1, self.messages.message(method.input_type)),
            (1, self.messages.mutants(method.input_type, corpus)),
        )

    def budget(self, planned: int) -> int:
        """This test's requests: its share, and what the tests before it owed."""
        examples, self.owed = planned + self.owed, 0
        return examples

    def settle(self, examples: int, sent_before: int) -> None:
        self.owed = max(0, examples - (self.sent() - sent_before))

    def sent(self) -> int:
        return sum(self.codes.values())

    def http_budget(self, planned: int) -> int:
        examples, self.http_owed = planned + self.http_owed, 0
        return examples

    def http_settle(self, examples: int, sent_before: int) -> None:
        self.http_owed = max(0, examples - (self.http_sent() - sent_before))

    def http_sent(self) -> int:
        return sum(self.http_codes.values())

    def send(self, method: MethodDescriptor, body: bytes) -> tuple[str, str]:
        """Send `body` as the request of `method`: the code it got ("OPEN": a stream still
        open when it was cancelled) and the status details."""
        response_type = GetMessageClass(method.output_type)
        path = f"/{method.containing_service.full_name}/{method.name}"
        kwargs: dict[str, Any] = {
            "request_serializer": lambda b: b,
            "response_deserializer": response_type.FromString,
        }
        code, details = "OK", ""
        try:
            if method.server_streaming:
                call = self.channel.unary_stream(path, **kwargs)(body, timeout=STREAM_TIMEOUT_S)
                code = self._read_stream(method.name, call)
                self.pools.remember(method, body)
            else:
                response = self.channel.unary_unary(path, **kwargs)(body, timeout=UNARY_TIMEOUT_S)
                self.pools.harvest(method.name, response)
                self.pools.remember(method, body, response)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            code, details = exc.code().name, exc.details() or ""
        self.codes[code] += 1
        self.by_method[method.name][code] += 1
        return code, details

    def _read_stream(self, method: str, call: Any) -> str:
        started = time.monotonic()
        for n, response in enumerate(call, 1):
            self.pools.harvest(method, response)
            if n >= MAX_STREAM_MESSAGES or time.monotonic() - started > STREAM_WINDOW_S:
                call.cancel()
                return "OPEN"
        return "OK"

    def check(self, method: MethodDescriptor, body: bytes, shown: object) -> str:
        """Send one request; fail on a status no client can act on, a hang or a crash."""
        code, details = self.send(method, body)
        self.server.assert_alive()
        assert code not in {c.name for c in BAD_CODES}, (
            f"{method.name} answered {code}: {details}\nrequest: {_show(shown)}"
        )
        assert code != "DEADLINE_EXCEEDED", f"{method.name} hung\nrequest: {_show(shown)}"
        # The client's own limit on the status it reads (16 KB): the answer's error was lost.
        assert "metadata size exceeds" not in details, (
            f"{method.name} answered a status too large to read: {details}\nrequest: {_show(shown)}"
        )
        return code

    def check_http(self, request: HttpRequest) -> Answer:
        """Send one request to the HTTP port; fail on a 5xx, a Connect code no client can act
        on, an error that is not Connect's JSON, an answer that does not decode, a hang or a
        crash. Errors the server logs are kept in `logged` (test_http_* fail on them)."""
        started = time.monotonic()
        try:
            answer = self.web.exchange(request)
        except TimeoutError as exc:
            raise AssertionError(f"the HTTP port hung: {exc}\nrequest: {request.show()}") from None
        finally:
            self.http_seconds += time.monotonic() - started
        self.server.assert_alive()
        self.http_codes[answer.label] += 1
        self.http_by_kind[request.kind][answer.label] += 1
        self._read_log(request)
        assert not answer.problems, (
            f"the HTTP port answered {answer.label}: "
            + "; ".join(answer.problems)
            + f"\nrequest: {request.show()}"
        )
        for response in answer.responses:
            if request.rpc is not None:
                self.pools.harvest(request.rpc.name, response)
        return answer

    def mark_log(self) -> None:
        """Errors logged from now on are the HTTP round's."""
        self.log_read = self.server.log_path.stat().st_size

    def _read_log(self, request: HttpRequest) -> None:
        with self.server.log_path.open("rb") as log:
            log.seek(self.log_read)
            new = log.read()
        self.log_read += len(new)
        text = new.decode(errors="replace")
        if any(sign in text for sign in ("Traceback", "Error in ASGI", "internal error")):
            self.logged.append(f"after (or just before) {request.show(300)}:\n{text[-3000:]}")

    def assert_nothing_logged(self) -> None:
        time.sleep(0.05)  # an error logged just after its answer
        with self.server.log_path.open("rb") as log:
            log.seek(self.log_read)
            tail = log.read().decode(errors="replace")
        if any(sign in tail for sign in ("Traceback", "Error in ASGI", "internal error")):
            self.logged.append(f"after the last request:\n{tail[-3000:]}")
        self.mark_log()
        logged, self.logged = self.logged, []
        assert not logged, f"the server logged {len(logged)} error(s):\n" + "\n\n".join(logged[:3])

    def summary(self) -> str:
        lines = [
            f"fuzz: {self.sent()} requests in {time.monotonic() - self.started:.1f} s "
            f"({'long' if LONG else 'CI'} mode, {REQUESTS} planned, {BACKEND})",
            "  all: " + _counts(self.codes),
        ]
        for name, codes in sorted(self.by_method.items()):
            lines.append(f"  {name}: {_counts(codes)}")
        lines.append(
            f"fuzz, HTTP port: {self.http_sent()} requests in {self.http_seconds:.1f} s "
            f"({HTTP_REQUESTS} planned)"
        )
        lines.append("  all: " + _counts(self.http_codes))
        for kind, codes in sorted(self.http_by_kind.items()):
            lines.append(f"  {kind}: {_counts(codes)}")
        return "\n".join(lines)


def _counts(codes: Counter[str]) -> str:
    return ", ".join(f"{code} {count}" for code, count in codes.most_common())


def _show(value: object, limit: int = 2000) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _seed(stub: pb_grpc.AgentServiceStub, pools: Pools) -> None:
    """Things for requests to name (threads; runs ended, suspended and with a task;
    schedules; a second page of each list, for its token), and a request that works for
    most methods, for mutants to start from."""

    def call(method: str, request: Message) -> Any:
        response = getattr(stub, method)(request, timeout=UNARY_TIMEOUT_S)
        if isinstance(response, Message):
            pools.harvest(method, response)
        else:  # a stream
            for item in response:
                pools.harvest(method, item)
            response = None
        pools.remember(SERVICE.methods_by_name[method], request.SerializeToString(), response)
        return response

    for n in range(3):
        call(
            "CreateThread", pb.CreateThreadRequest(resource_id=f"user-{n % 2}", metadata={"n": "1"})
        )
    thread = pools.pick("thread_id", 0)
    inputs = [
        json.dumps({"steps": [{"text": 2}]}),
        json.dumps({"steps": [{"tool": "approve_me", "args": {"action": "x"}}]}),
        json.dumps({"steps": [{"tool": "slow", "args": {"key": "k", "duration_ms": 50}}]}),
    ]
    for n, text in enumerate(inputs):
        call("StartRun", pb.StartRunRequest(agent_id="scripted", input=text, request_id=f"s{n}"))
    call("Stream", pb.StreamRequest(agent_id="scripted", input=inputs[0], thread_id=thread))
    for _ in range(2):
        call(
            "CreateSchedule",
            pb.CreateScheduleRequest(
                agent_id="scripted", cron="0 0 1 1 *", input=inputs[0], paused=True
            ),
        )
    schedule = pools.pick("schedule_id", 0)
    for _ in range(2):
        call("TriggerSchedule", pb.TriggerScheduleRequest(schedule_id=schedule))
    suspended = pools.pick("run_id", 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the runs, and the task, get going
        tasks = call("ListTasks", pb.ListTasksRequest()).tasks
        run = stub.GetRun(pb.GetRunRequest(run_id=suspended)).run
        if tasks and run.pending_interrupts:
            break
        time.sleep(0.05)
    call("GetRun", pb.GetRunRequest(run_id=suspended))
    call("Observe", pb.ObserveRequest(run_id=pools.pick("run_id", 0)))
    call("GetThread", pb.GetThreadRequest(thread_id=thread))
    call("GetSchedule", pb.GetScheduleRequest(schedule_id=schedule))
    call("GetTask", pb.GetTaskRequest(task_id=pools.pick("task_id", 0)))
    call(
        "UpdateSchedule",
        pb.UpdateScheduleRequest(
            schedule=pb.Schedule(schedule_id=schedule, cron="0 0 2 1 *"),
            update_mask=field_mask_pb2.FieldMask(paths=["cron"]),
        ),
    )
    for method, request in [
        ("ListRuns", pb.ListRunsRequest(page_size=1)),
        ("ListThreads", pb.ListThreadsRequest(page_size=1)),
        ("ListTasks", pb.ListTasksRequest(page_size=1)),
        ("ListSchedules", pb.ListSchedulesRequest(page_size=1)),
        ("ListScheduleRuns", pb.ListScheduleRunsRequest(schedule_id=schedule, page_size=1)),
        ("ListThreadMessages", pb.ListThreadMessagesRequest(thread_id=thread, page_size=1)),
    ]:
        call(method, request)


@pytest.fixture(scope="module")
def fuzz(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzz]:
    redis_url = "" if BACKEND == "memory" else request.getfixturevalue("redis_url")
    server = start_server(redis_url, tmp_path_factory.mktemp("fuzz") / "server.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    web = Web(server.http_port)
    try:
        stub = pb_grpc.AgentServiceStub(channel)
        pools = Pools()
        _seed(stub, pools)
        agents = [a.agent_id for a in stub.ListAgents(pb.ListAgentsRequest()).agents]
        messages = Messages(hints(pools, [*agents, "nobody", ""]))
        found = Fuzz(server, channel, web, pools, messages)
        yield found
        print("\n" + found.summary())
    finally:
        web.close()
        channel.close()
        code = server.stop()
        print(f"fuzz: the server stopped with exit code {code}")


def _method_id(method: MethodDescriptor) -> str:
    return method.name


@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_generated_requests(
    method: MethodDescriptor, fuzz: Fuzz, request: pytest.FixtureRequest
) -> None:
    examples = fuzz.budget(GENERATED[method.full_name])
    request.applymarker(pytest.mark.timeout(_timeout_for(examples)))
    sent_before = fuzz.sent()
    for count in _rounds(examples):

        @_settings(count)
        @given(fuzz.requests(method))
        def send(message: Message) -> None:
            fuzz.check(method, message.SerializeToString(), message)

        send()
    fuzz.settle(examples, sent_before)


@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_random_bytes(method: MethodDescriptor, fuzz: Fuzz, request: pytest.FixtureRequest) -> None:
    examples = fuzz.budget(RAW[method.full_name])
    request.applymarker(pytest.mark.timeout(_timeout_for(examples)))
    sent_before = fuzz.sent()
    for count in _rounds(examples):

        @_settings(count)
        @given(raw_bodies(method.input_type, fuzz.requests(method)))
        def send(body: bytes) -> None:
            fuzz.check(method, body, body)

        send()
    fuzz.settle(examples, sent_before)


# -- the HTTP port ---------------------------------------------------------------------


@pytest.mark.parametrize("method", HTTP_METHODS, ids=_method_id)
def test_http_messages(
    method: MethodDescriptor, fuzz: Fuzz, request: pytest.FixtureRequest
) -> None:
    """The gRPC round's requests over Connect (binary; JSON, canonical or mutated) and
    gRPC-Web."""
    examples = fuzz.http_budget(HTTP_MESSAGES[method.full_name])
    request.applymarker(pytest.mark.timeout(_timeout_for(examples)))
    sent_before = fuzz.http_sent()
    fuzz.mark_log()
    for count in _rounds(examples):

        @_settings(count)
        @given(
            fuzz.requests(method).flatmap(
                lambda m: st.tuples(st.just(m), message_requests(method, m))
            )
        )
        def send(drawn: tuple[Message, HttpRequest]) -> None:
            message, http = drawn
            answer = fuzz.check_http(http)
            worked = answer.label in ("200 ok", "200 grpc ok", "200 open")
            if (
                worked
                and (method.server_streaming or answer.responses)
                and http.kind in ("connect-proto", "grpc-web")
                and b"proto" in (http.header("content-type") or b"")
            ):
                unary = None if method.server_streaming else answer.responses[0]
                fuzz.pools.remember(method, message.SerializeToString(), unary)

        send()
    fuzz.http_settle(examples, sent_before)
    fuzz.assert_nothing_logged()


def test_http_raw_requests(fuzz: Fuzz, request: pytest.FixtureRequest) -> None:
    """Requests no client of the API makes: any route, HTTP method, content type, body,
    framing and protocol headers."""
    examples = fuzz.http_budget(HTTP_RAW)
    request.applymarker(pytest.mark.timeout(_timeout_for(examples)))
    sent_before = fuzz.http_sent()
    fuzz.mark_log()
    own_origin = f"http://127.0.0.1:{fuzz.server.http_port}"
    for count in _rounds(examples):
        messages = {m.full_name: fuzz.requests(m) for m in HTTP_METHODS}

        @_settings(count)
        @given(raw_requests(HTTP_METHODS, messages, own_origin))
        def send(http: HttpRequest) -> None:
            fuzz.check_http(http)

        send()
    fuzz.http_settle(examples, sent_before)
    fuzz.assert_nothing_logged()


def test_http_events(fuzz: Fuzz, request: pytest.FixtureRequest) -> None:
    """GET /v1/runs/{run_id}/events with run ids that exist and garbage, and resume points
    (Last-Event-ID, ?offset=, ?incarnation=) valid and not; a live run's stream is read
    for a while and closed."""
    examples = fuzz.http_budget(HTTP_SSE)
    request.applymarker(pytest.mark.timeout(_timeout_for(examples)))
    sent_before = fuzz.http_sent()
    fuzz.mark_log()
    run_ids = weighted((3, fuzz.pools.draw("run_id")), (1, RUN_IDS))
    incarnations = weighted((2, fuzz.pools.draw("incarnation")), (1, strings(oversized=False)))
    for count in _rounds(examples):

        @_settings(count)
        @given(sse_requests(run_ids, incarnations))
        def send(http: HttpRequest) -> None:
            fuzz.check_http(http)

        send()
    fuzz.http_settle(examples, sent_before)
    fuzz.assert_nothing_logged()


def test_still_serving_after_fuzzing(fuzz: Fuzz) -> None:
    """Runs last: the server is alive, healthy, and runs a run to its finish."""
    fuzz.server.assert_alive()
    health = health_pb2_grpc.HealthStub(fuzz.channel)
    for service in ("", "keel.v1.AgentService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    stub = pb_grpc.AgentServiceStub(fuzz.channel)
    script = json.dumps({"steps": [{"text": 3}]})
    responses = list(stub.Stream(pb.StreamRequest(agent_id="scripted", input=script), timeout=30))
    events = [e for r in responses if r.WhichOneof("kind") == "events" for e in r.events.events]
    assert events[-1].WhichOneof("payload") == "finish", events[-1]
    deltas = [e.text_delta.delta for e in events if e.WhichOneof("payload") == "text_delta"]
    assert "".join(deltas) == "t0 t1 t2 done"
    # The HTTP port too: a run streamed over Connect to its finish, then read again as SSE.
    with AgentServiceClientSync(
        fuzz.web.base, http_client=pyqwest.SyncClient(), timeout_ms=30_000
    ) as web:
        streamed = list(web.stream(pb.StreamRequest(agent_id="scripted", input=script)))
    events = [e for r in streamed if r.WhichOneof("kind") == "events" for e in r.events.events]
    assert events[-1].WhichOneof("payload") == "finish", events[-1]
    deltas = [e.text_delta.delta for e in events if e.WhichOneof("payload") == "text_delta"]
    assert "".join(deltas) == "t0 t1 t2 done"
    sse = fuzz.check_http(HttpRequest("sse", "GET", f"/v1/runs/{events[-1].run_id}/events"))
    assert sse.label == "200 sse", sse
    log = fuzz.server.log_path.read_text(errors="replace")
    for sign in ("internal error", "Traceback", "Error in ASGI"):
        assert sign not in log, fuzz.server.log_tail()
