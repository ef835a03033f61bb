"""The OpenAI-compatible agent against a local fake of /v1/chat/completions.

The fake speaks real HTTP/1.1 on 127.0.0.1 and streams `text/event-stream`
chunks shaped like the OpenAI API's, so the whole real path runs: the OpenAI
SDK, pydantic-ai's chat-completions model, the agent loop and its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.models.openai import OpenAIChatModel

from server.agents.loop import run_agent_loop
from server.agents.openai_compat import build_openai_agent
from server.agents.registry import describe
from server.agents.types import AgentSpec, RunInfo
from tests.sinks import ListSink

MODEL = "keel-test-model"
API_KEY = "sk-keel-test"


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Stream:
    """Reply with these chat.completion.chunk deltas as server-sent events."""

    chunks: list[dict[str, Any]]


@dataclass
class Fail:
    """Reply with an HTTP error."""

    status: int
    reason: str


@dataclass
class FakeOpenAI:
    """A tiny OpenAI-compatible server: one scripted reply per request, in order."""

    replies: list[Stream | Fail]
    requests: list[Recorded] = field(default_factory=list)
    base_url: str = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():  # keep-alive: many requests
                method, path, _ = request_line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, value = line.decode().split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Recorded(method, path, headers, json.loads(body or b"{}")))
                reply = self.replies.pop(0)
                if isinstance(reply, Fail):
                    await self._fail(writer, reply)
                else:
                    await self._stream(writer, reply)
        except (ConnectionResetError, asyncio.IncompleteReadError):
            pass  # the client hung up, which clients do
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _stream(self, writer: asyncio.StreamWriter, reply: Stream) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"content-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n"
            b"cache-control: no-cache\r\n\r\n"
        )
        events = [f"data: {json.dumps(chunk)}\n\n" for chunk in reply.chunks]
        for event in [*events, "data: [DONE]\n\n"]:
            data = event.encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0)  # let the client see chunks one by one
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _fail(self, writer: asyncio.StreamWriter, reply: Fail) -> None:
        body = json.dumps({"error": {"message": reply.reason, "type": "server_error"}}).encode()
        writer.write(
            f"HTTP/1.1 {reply.status} Error\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(replies=[])
    server = await asyncio.start_server(fake._handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fake.base_url = f"http://127.0.0.1:{port}/v1"
    async with server:
        yield fake
        server.close()


@pytest.fixture
async def build_assistant(fake_openai: FakeOpenAI) -> AsyncIterator[Callable[..., AgentSpec]]:
    """build_openai_agent aimed at the fake; closes the SDK clients (and their sockets) after."""
    specs: list[AgentSpec] = []

    def build(**options: Any) -> AgentSpec:
        spec = build_openai_agent(
            base_url=fake_openai.base_url, api_key=API_KEY, model_name=MODEL, **options
        )
        specs.append(spec)
        return spec

    yield build
    for spec in specs:
        model = spec.agent.model
        assert isinstance(model, OpenAIChatModel)
        await model.client.close()


def chunk(
    response_id: str, delta: dict[str, Any], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": 1_760_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_keel",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(response_id: str, prompt: int, completion: int) -> dict[str, Any]:
    # With stream_options.include_usage the API sends usage in a last chunk without choices.
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": 1_760_000_000,
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def text_reply(response_id: str, pieces: list[str], prompt: int, completion: int) -> Stream:
    first, *rest = pieces
    return Stream(
        [
            chunk(response_id, {"role": "assistant", "content": first}),
            *(chunk(response_id, {"content": piece}) for piece in rest),
            chunk(response_id, {}, finish_reason="stop"),
            usage_chunk(response_id, prompt, completion),
        ]
    )


class NoCounters:
    async def incr_counter(self, run_id: str, key: str) -> int:
        raise AssertionError("the assistant has no counters")


def run_info() -> RunInfo:
    return RunInfo(run_id="run-openai", counters=NoCounters())


async def test_streamed_text_and_usage_arrive_as_events(
    fake_openai: FakeOpenAI, build_assistant: Callable[..., AgentSpec]
) -> None:
    fake_openai.replies.append(text_reply("chatcmpl-1", ["Hel", "lo", ", world"], 12, 3))
    spec = build_assistant(instructions="Be brief.")
    sink = ListSink()

    result = await run_agent_loop(spec, "Say hello", run_info=run_info(), sink=sink)

    (request,) = fake_openai.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.body["model"] == MODEL
    assert request.body["stream"] is True
    assert request.body["messages"][-1] == {"role": "user", "content": "Say hello"}
    assert any("Be brief." in str(m.get("content")) for m in request.body["messages"])

    assert sink.kinds() == [
        "step_start",
        "text_start", "text_delta", "text_delta", "text_delta", "text_end",
        "response_metadata",
        "step_finish",
    ]  # fmt: skip
    assert [p.delta for p in sink.payloads("text_delta")] == ["Hel", "lo", ", world"]
    (metadata,) = sink.payloads("response_metadata")
    assert metadata.model_name == MODEL
    assert metadata.provider_response_id == "chatcmpl-1"
    assert metadata.provider_name == "openai"
    (finish,) = sink.payloads("step_finish")
    assert (finish.usage.input_tokens, finish.usage.output_tokens) == (12, 3)
    assert finish.usage.requests == 1
    assert finish.finish_reason == "stop"

    assert result.output_text == "Hello, world"
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.requests) == (
        12,
        3,
        1,
    )


async def test_streamed_tool_call_runs_the_tool_and_feeds_the_result_back(
    fake_openai: FakeOpenAI, build_assistant: Callable[..., AgentSpec]
) -> None:
    fake_openai.replies += [
        Stream(
            [
                chunk(
                    "chatcmpl-t1",
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_abc",
                                "type": "function",
                                "function": {"name": "add", "arguments": ""},
                            }
                        ],
                    },
                ),
                chunk(
                    "chatcmpl-t1",
                    {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 2,'}}]},
                ),
                chunk(
                    "chatcmpl-t1",
                    {"tool_calls": [{"index": 0, "function": {"arguments": ' "b": 3}'}}]},
                ),
                chunk("chatcmpl-t1", {}, finish_reason="tool_calls"),
                usage_chunk("chatcmpl-t1", 20, 10),
            ]
        ),
        text_reply("chatcmpl-t2", ["2 + 3 = ", "5"], 40, 5),
    ]
    spec = build_assistant()

    @spec.agent.tool_plain
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    sink = ListSink()
    result = await run_agent_loop(spec, "What is 2 + 3?", run_info=run_info(), sink=sink)

    assert sink.kinds() == [
        "step_start",
        "tool_input_start", "tool_input_delta", "tool_input_delta", "tool_input_end",
        "response_metadata",
        "tool_call", "tool_result",
        "step_finish",
        "step_start",
        "text_start", "text_delta", "text_delta", "text_end",
        "response_metadata",
        "step_finish",
    ]  # fmt: skip
    assert [e.step for e in sink.events] == [1] * 9 + [2] * 7
    (start,) = sink.payloads("tool_input_start")
    assert (start.tool_call_id, start.tool_name) == ("call_abc", "add")
    streamed_args = "".join(p.delta for p in sink.payloads("tool_input_delta"))
    assert json.loads(streamed_args) == {"a": 2, "b": 3}
    (call,) = sink.payloads("tool_call")
    assert (call.tool_call_id, json.loads(call.args_json)) == ("call_abc", {"a": 2, "b": 3})
    (tool_result,) = sink.payloads("tool_result")
    assert (tool_result.tool_call_id, json.loads(tool_result.result_json)) == ("call_abc", 5)
    first, second = sink.payloads("step_finish")
    assert (first.usage.input_tokens, first.usage.output_tokens, first.usage.tool_calls) == (
        20,
        10,
        1,
    )
    assert first.finish_reason == "tool_call"
    assert (second.usage.input_tokens, second.usage.output_tokens) == (40, 5)
    assert result.output_text == "2 + 3 = 5"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (60, 15)

    # The model saw its own tool call and the tool's result in the second request.
    first_request, second_request = fake_openai.requests
    assert [t["function"]["name"] for t in first_request.body["tools"]] == ["add"]
    messages = second_request.body["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == "call_abc"
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_abc", "content": "5"}


async def test_provider_errors_are_not_retried_by_the_sdk(
    fake_openai: FakeOpenAI, build_assistant: Callable[..., AgentSpec]
) -> None:
    # Keel owns retrying: a 500 must reach the loop's caller after one attempt.
    fake_openai.replies += [
        Fail(500, "overloaded"),
        text_reply("chatcmpl-late", ["too late"], 1, 1),
    ]
    spec = build_assistant()
    sink = ListSink()

    with pytest.raises(ModelHTTPError, match="overloaded") as caught:
        await run_agent_loop(spec, "hi", run_info=run_info(), sink=sink)

    assert len(fake_openai.requests) == 1
    assert caught.value.status_code == 500
    assert sink.kinds() == ["step_start"]


def test_the_assistant_describes_itself_as_a_chat_completions_model() -> None:
    spec = build_openai_agent(base_url="http://127.0.0.1:9/v1", api_key="k", model_name="gpt-4o")
    model_name, tools = describe(spec)
    assert model_name == "openai-chat:gpt-4o"
    assert tools == ()
    assert "gpt-4o" in spec.description
