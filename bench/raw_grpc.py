"""A raw grpc.aio server: the gRPC ceilings, with Keel's own messages and no Keel logic.

`python -m bench.raw_grpc` binds 127.0.0.1 on a free port, prints
`raw grpc listening on 127.0.0.1:PORT` and serves one server-streaming
method, /bench.Raw/Stream, whose request is JSON:

- {"mode": "stream", "messages": M, "batch": B}: M StreamResponse messages,
  each an EventBatch of B text-delta events shaped like Keel's (B = 1: one
  event per message, as Keel sends a slow run's events);
- {"mode": "fanout", "group": G, "streams": S, "ticks": T, "interval_ms": I}:
  once S streams of group G have joined, one ticker stamps an event with the
  time (as Keel's writer does) every I ms and queues it to every stream of
  the group, T times: the floor of Keel's live fan-out latency.

The server builds each message once and lets grpc serialize it per stream,
as Keel's servicer does. It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from keel.v1 import agent_service_pb2 as pb

METHOD = "/bench.Raw/Stream"
READY = "raw grpc listening on "


def text_delta_event(index: int, *, run_id: str = "0" * 32) -> Any:
    """An AgentEvent of the size Keel streams for the scripted agent's text deltas."""
    event = pb.AgentEvent(
        run_id=run_id,
        index=index,
        step=1,
        attempt=1,
        text_delta=pb.TextDelta(part_index=0, delta=f"t{index} "),
    )
    event.time.FromNanoseconds(time.time_ns())
    return event


def event_batch(first_index: int, size: int) -> Any:
    return pb.StreamResponse(
        events=pb.EventBatch(events=[text_delta_event(first_index + i) for i in range(size)])
    )


@dataclass
class _Group:
    """The streams of one fan-out measurement."""

    streams: int
    queues: list[asyncio.Queue[Any]] = field(default_factory=list)
    ticker: asyncio.Task[None] | None = None


class RawServer:
    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}

    def stream(self, request: bytes) -> AsyncIterator[Any]:
        """The messages answering one request (see the module docstring)."""
        params: dict[str, Any] = json.loads(request)
        if params["mode"] == "fanout":
            return self._fanout(params)
        return self._stream(int(params["messages"]), int(params.get("batch", 1)))

    async def _stream(self, messages: int, batch: int) -> AsyncIterator[Any]:
        # Built once: a real server builds each message too, but that is
        # protobuf's 1-2 us, not the framework this ceiling measures.
        template = event_batch(10_000, batch)
        for _ in range(messages):
            yield template

    async def _fanout(self, params: dict[str, Any]) -> AsyncIterator[Any]:
        name = str(params["group"])
        group = self._groups.setdefault(name, _Group(int(params["streams"])))
        queue: asyncio.Queue[Any] = asyncio.Queue()
        group.queues.append(queue)
        if len(group.queues) == group.streams:
            group.ticker = asyncio.create_task(
                self._tick(name, int(params["ticks"]), int(params["interval_ms"]) / 1000)
            )
        while (message := await queue.get()) is not None:
            yield message

    async def _tick(self, name: str, ticks: int, interval_s: float) -> None:
        group = self._groups[name]
        for index in range(ticks):
            message = pb.StreamResponse(events=pb.EventBatch(events=[text_delta_event(index)]))
            for queue in group.queues:
                queue.put_nowait(message)
            await asyncio.sleep(interval_s)
        for queue in group.queues:
            queue.put_nowait(None)
        del self._groups[name]


async def serve() -> None:
    raw = RawServer()

    async def handler(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for message in raw.stream(request):
            yield message

    server = grpc.aio.server()
    rpc: grpc.RpcMethodHandler[bytes, Any] = grpc.unary_stream_rpc_method_handler(
        handler,
        request_deserializer=lambda data: data,
        response_serializer=lambda message: message.SerializeToString(),
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Raw", {"Stream": rpc}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY}127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(grace=0)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
