"""`python -m bench.web [--quick] [--out DIR]`: what the HTTP port's transports cost next to gRPC.

One Keel server (memory store, the scripted agent, `--http-port 0`) serves
both ports. The benchmark makes a run that has ended with N text deltas
(N + 8 events), then replays it from offset 0 over each transport, one
replay after another on one connection per transport:

    grpc                     Observe over gRPC (the ceiling)
    connect-binary-http1     Observe over Connect, protobuf binary, HTTP/1.1
    connect-binary-http2     the same over HTTP/2 (cleartext)
    connect-json-http1       Observe over Connect, JSON, HTTP/1.1
    grpc-web-binary-http1    Observe over gRPC-Web, protobuf binary, HTTP/1.1
    sse                      GET /v1/runs/{run_id}/events (a plain HTTP/1.1 client)
    connect-binary-http1-gzip  Connect binary as the Python Connect client asks by
                             default: messages gzipped (browsers' Connect client does not)

and in a live case, runs streamed as they are produced (Stream, `live_runs`
one after another per measurement) over gRPC, Connect binary and Connect
JSON (HTTP/1.1).

Each measurement reads the server's CPU time (/proc, the server and its
descendants: bench/cpu.py) and the client's (this process, every thread)
right before and after, and counts the events received: events/s (wall),
server and client CPU µs per event. Every transport is measured `rounds`
times, interleaved (round r starts at the r-th transport), and reported as
the median; its ratio to gRPC is the median of the per-round ratios (each
against the gRPC measurement of the same round). Every stream is checked:
each event from offset 0 to the terminal one, exactly once, in order.

The clients run in this process (asyncio): grpc.aio, connectrpc's generated
client on pyqwest, httpx2 for SSE. Everything binds 127.0.0.1. Bounded: the
replays of one measurement are a fixed count (calibrated once per transport
to last about `window_s`, within [min_replays, max_replays]); each stream
has a timeout and the whole benchmark a deadline. Writes DIR/web.json and
DIR/web.md (the tables); docs/perf/web.md is the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx2
import pyqwest
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.protocol import ProtocolType
from google.protobuf import json_format
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel.v1.agent_service_connect import AgentServiceClient

from bench.procs import ROOT, SCRIPTED_AGENTS, BenchError, Launcher, ServerProcess
from bench.stats import median, spread

Params = dict[str, Any]
AGENT = "scripted"
TERMINAL = frozenset({"finish", "error", "abort"})
WARM_UP_DELTAS = 100
STREAM_TIMEOUT_S = 60.0
HTTP_READY = "keel http listening on "
GRPC_READY = "keel listening on "
PROFILE_S = 60.0  # the deadline's extension for --py-spy's extra pass


@dataclass(frozen=True)
class Sizes:
    deltas: int  # the replayed run: this many text deltas (deltas + 8 events)
    window_s: float  # a measurement replays the run for about this long
    min_replays: int
    max_replays: int
    rounds: int  # interleaved repetitions of every measurement
    live_deltas: int  # the live case: runs of this many deltas
    live_runs: int  # runs per live measurement
    deadline_s: float  # the whole benchmark, server start included


FULL = Sizes(
    deltas=5000,
    window_s=2.5,
    min_replays=3,
    max_replays=2000,
    rounds=3,
    live_deltas=5000,
    live_runs=8,
    deadline_s=170.0,
)
QUICK = Sizes(
    deltas=300,
    window_s=0.2,
    min_replays=2,
    max_replays=200,
    rounds=3,
    live_deltas=1000,
    live_runs=2,
    deadline_s=18.0,
)


def text_script(deltas: int) -> str:
    return json.dumps({"steps": [{"text": deltas}]})


# -- what a stream delivered ----------------------------------------------------------


@dataclass
class Check:
    """Every event from `offset` to a terminal one, exactly once and in order."""

    offset: int = 0
    events: int = 0
    messages: int = 0  # protocol messages carrying events (SSE: one per event)
    next_index: int = -1
    in_order: bool = True
    terminal: bool = False
    run_id: str = ""

    def batch(self, first: int, last: int, count: int, terminal: bool) -> None:
        expected = self.offset if self.next_index < 0 else self.next_index
        if first != expected or last - first + 1 != count:
            self.in_order = False
        self.next_index = last + 1
        self.events += count
        self.messages += 1
        self.terminal = terminal

    def take(self, response: Any) -> None:
        """An ObserveResponse or StreamResponse (gRPC or Connect: the same message types)."""
        kind = response.WhichOneof("kind")
        if kind == "snapshot":
            self.run_id = response.snapshot.run.run_id
        elif kind == "events":
            batch = response.events.events
            if batch:
                terminal = batch[-1].WhichOneof("payload") in TERMINAL
                self.batch(batch[0].index, batch[-1].index, len(batch), terminal)

    @property
    def ok(self) -> bool:
        return self.in_order and self.terminal and self.events == self.next_index - self.offset


# -- transports -----------------------------------------------------------------------


class Transport(Protocol):
    name: str
    label: str

    async def replay(self, run_id: str) -> Check: ...

    async def stream(self, script: str) -> Check: ...

    async def aclose(self) -> None: ...


class GrpcTransport:
    name = "grpc"
    label = "gRPC (HTTP/2)"

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.AgentServiceStub(self._channel)

    async def replay(self, run_id: str) -> Check:
        check = Check()
        async for response in self._stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0)):
            check.take(response)
        return check

    async def stream(self, script: str) -> Check:
        check = Check()
        async for response in self._stub.Stream(pb.StreamRequest(agent_id=AGENT, input=script)):
            check.take(response)
        return check

    async def start_run(self, script: str) -> str:
        started = await self._stub.StartRun(pb.StartRunRequest(agent_id=AGENT, input=script))
        run_id: str = started.run.run_id
        return run_id

    async def aclose(self) -> None:
        await self._channel.close()


class ConnectTransport:
    """connectrpc's generated client over pyqwest. Without gzip unless asked: browsers'
    Connect and gRPC-Web clients (@connectrpc/connect-web) neither ask for nor send it."""

    def __init__(
        self,
        name: str,
        label: str,
        base_url: str,
        *,
        protocol: ProtocolType,
        json_codec: bool,
        http2: bool,
        gzip: bool = False,
    ) -> None:
        self.name = name
        self.label = label
        version = pyqwest.HTTPVersion.HTTP2 if http2 else pyqwest.HTTPVersion.HTTP1
        self._transport = pyqwest.HTTPTransport(http_version=version)
        self._http = pyqwest.Client(self._transport)
        codec = google_protobuf_json_codec() if json_codec else google_protobuf_binary_codec()
        compression: dict[str, Any] = {} if gzip else {"accept_compression": ()}
        self._client = AgentServiceClient(
            base_url,
            protocol=protocol,
            codec=codec,
            http_client=self._http,
            send_compression=None,
            **compression,
        )

    async def replay(self, run_id: str) -> Check:
        check = Check()
        async for response in self._client.observe(pb.ObserveRequest(run_id=run_id, offset=0)):
            check.take(response)
        return check

    async def stream(self, script: str) -> Check:
        check = Check()
        async for response in self._client.stream(pb.StreamRequest(agent_id=AGENT, input=script)):
            check.take(response)
        return check

    async def aclose(self) -> None:
        await self._client.close()
        await self._transport.aclose()


class SseTransport:
    """GET /v1/runs/{run_id}/events with httpx2 (HTTP/1.1), parsed as an EventSource would
    split it: messages end with a blank line; `id:` is the event's index."""

    name = "sse"
    label = "SSE (HTTP/1.1, JSON)"

    def __init__(self, base_url: str) -> None:
        self._http = httpx2.AsyncClient(base_url=base_url, timeout=STREAM_TIMEOUT_S)

    async def replay(self, run_id: str) -> Check:
        check = Check()
        buffer = b""
        last_data = b""
        async with self._http.stream("GET", f"/v1/runs/{run_id}/events") as response:
            if response.status_code != 200:
                raise BenchError(f"SSE answered {response.status_code}")
            async for chunk in response.aiter_bytes():
                buffer += chunk
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    if not block.startswith(b"id: "):
                        continue  # the snapshot, a heartbeat
                    id_line, _, data = block.partition(b"\n")
                    index = int(id_line[4:])
                    check.batch(index, index, 1, False)
                    last_data = data
        if last_data.startswith(b"data: "):
            check.terminal = bool(TERMINAL & json.loads(last_data[6:]).keys())
        return check

    async def stream(self, script: str) -> Check:
        raise NotImplementedError("SSE only reads runs")

    async def aclose(self) -> None:
        await self._http.aclose()


REPLAYED = (
    "grpc",
    "connect-binary-http1",
    "connect-binary-http2",
    "connect-json-http1",
    "grpc-web-binary-http1",
    "sse",
    "connect-binary-http1-gzip",
)
LIVE = ("grpc", "connect-binary-http1", "connect-json-http1")


def transports(grpc_target: str, base_url: str) -> dict[str, Transport]:
    def connect(
        name: str, label: str, protocol: ProtocolType, json_codec: bool, http2: bool, gzip: bool
    ) -> ConnectTransport:
        return ConnectTransport(
            name, label, base_url, protocol=protocol, json_codec=json_codec, http2=http2, gzip=gzip
        )

    connect_, grpc_web = ProtocolType.CONNECT, ProtocolType.GRPC_WEB
    made: list[Transport] = [
        GrpcTransport(grpc_target),
        connect("connect-binary-http1", "Connect binary, HTTP/1.1", connect_, False, False, False),
        connect("connect-binary-http2", "Connect binary, HTTP/2", connect_, False, True, False),
        connect("connect-json-http1", "Connect JSON, HTTP/1.1", connect_, True, False, False),
        connect(
            "grpc-web-binary-http1", "gRPC-Web binary, HTTP/1.1", grpc_web, False, False, False
        ),
        SseTransport(base_url),
        connect(
            "connect-binary-http1-gzip",
            "Connect binary, HTTP/1.1, gzip",
            connect_,
            False,
            False,
            True,
        ),
    ]
    return {t.name: t for t in made}


# -- measuring ------------------------------------------------------------------------


@dataclass
class Measurement:
    streams: int
    events: int
    messages: int
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float
    ok: bool

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def server_cpu_us_per_event(self) -> float:
        return self.server_cpu_s / self.events * 1e6 if self.events else math.nan

    @property
    def client_cpu_us_per_event(self) -> float:
        return self.client_cpu_s / self.events * 1e6 if self.events else math.nan

    def summary(self) -> Params:
        return {
            **asdict(self),
            "events_per_s": self.events_per_s,
            "server_cpu_us_per_event": self.server_cpu_us_per_event,
            "client_cpu_us_per_event": self.client_cpu_us_per_event,
            "server_cpu_ms_per_stream": self.server_cpu_s / self.streams * 1e3,
        }


async def _timed(call: Awaitable[Check]) -> Check:
    async with asyncio.timeout(STREAM_TIMEOUT_S):
        return await call


async def measure(
    server: ServerProcess, streams: int, one: Callable[[], Awaitable[Check]]
) -> Measurement:
    """`streams` streams one after another, with the server's and this process's CPU."""
    checks: list[Check] = []
    server_before, client_before = server.cpu_s(), time.process_time()
    start = time.perf_counter()
    for _ in range(streams):
        checks.append(await _timed(one()))
    wall_s = time.perf_counter() - start
    server_cpu_s = server.cpu_s() - server_before
    client_cpu_s = time.process_time() - client_before
    return Measurement(
        streams=streams,
        events=sum(c.events for c in checks),
        messages=sum(c.messages for c in checks),
        wall_s=wall_s,
        server_cpu_s=server_cpu_s,
        client_cpu_s=client_cpu_s,
        ok=all(c.ok for c in checks),
    )


FIGURES = ("events_per_s", "server_cpu_us_per_event", "client_cpu_us_per_event")


def summarize(rounds: dict[str, list[Measurement]], label: dict[str, str]) -> dict[str, Params]:
    """Medians over the rounds, and the median of the per-round ratios to gRPC's."""
    ceiling = rounds["grpc"]
    results: dict[str, Params] = {}
    for name, measured in rounds.items():
        row: Params = {
            "label": label[name],
            "ok": all(m.ok for m in measured),
            "streams_per_round": measured[0].streams,
            "events_per_stream": measured[0].events // max(1, measured[0].streams),
            "events_per_message": measured[0].events / max(1, measured[0].messages),
            "rounds": [m.summary() for m in measured],
        }
        for figure in FIGURES:
            values = [float(getattr(m, figure)) for m in measured]
            ratios = [
                float(getattr(m, figure)) / float(getattr(g, figure))
                for m, g in zip(measured, ceiling, strict=True)
            ]
            row[figure] = median(values)
            row[f"{figure}_spread"] = spread(values)
            row[f"{figure}_ratio"] = median(ratios)
        results[name] = row
    return results


def payload_sizes(check_response: pb.ObserveResponse) -> Params:
    """Bytes per event of one catch-up batch: protobuf binary, and the canonical JSON that
    Connect JSON and SSE send (MessageToDict on one line)."""
    events = list(check_response.events.events)
    binary = check_response.ByteSize()
    as_json = len(json_format.MessageToJson(check_response, indent=None).encode())
    sse_data = sum(
        len(json.dumps(json_format.MessageToDict(e), separators=(",", ":")).encode())
        for e in events
    )
    return {
        "events": len(events),
        "binary_bytes_per_event": binary / len(events),
        "json_bytes_per_event": as_json / len(events),
        "sse_data_bytes_per_event": sse_data / len(events),
    }


async def first_batch(target: str, run_id: str) -> pb.ObserveResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        async for response in stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0)):
            if response.WhichOneof("kind") == "events":
                return response
    raise BenchError("the run has no events")


@contextlib.contextmanager
def profiling(py_spy: str | None, pid: int, path: Path) -> Iterator[None]:
    """py-spy record the server while the block runs (when asked for)."""
    if py_spy is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # fmt: off
    recorder = subprocess.Popen(
        [
            py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
            "--output", str(path), "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # fmt: on
    try:
        time.sleep(0.5)  # py-spy attaches
        yield
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()


async def bench(
    server: ServerProcess, grpc_port: int, sizes: Sizes, py_spy: str | None, out: Path
) -> Params:
    target = f"127.0.0.1:{grpc_port}"
    made = transports(target, f"http://127.0.0.1:{server.port}")
    ceiling = made["grpc"]
    assert isinstance(ceiling, GrpcTransport)
    try:
        warm = await _timed(ceiling.stream(text_script(WARM_UP_DELTAS)))
        if not warm.ok:
            raise BenchError("the warm-up run failed its checks")
        # The run every replay reads: started, then waited for to its end.
        run_id = await ceiling.start_run(text_script(sizes.deltas))
        ended = await _timed(ceiling.replay(run_id))
        if not ended.ok:
            raise BenchError("the replayed run failed its checks")

        # Warm every transport up (its connection, its first call) and calibrate its count.
        replays: dict[str, int] = {}
        for name in REPLAYED:
            transport = made[name]
            await _timed(transport.replay(run_id))
            once = await measure(server, 1, functools.partial(transport.replay, run_id))
            if not once.ok:
                raise BenchError(f"{name}: a replay failed its checks")
            wanted = math.ceil(sizes.window_s / max(once.wall_s, 1e-6))
            replays[name] = min(sizes.max_replays, max(sizes.min_replays, wanted))
        for name in LIVE:
            await _timed(made[name].stream(text_script(WARM_UP_DELTAS)))

        replayed: dict[str, list[Measurement]] = {name: [] for name in REPLAYED}
        live: dict[str, list[Measurement]] = {name: [] for name in LIVE}
        for r in range(sizes.rounds):
            for name in REPLAYED[r:] + REPLAYED[:r]:
                transport = made[name]
                replayed[name].append(
                    await measure(
                        server, replays[name], functools.partial(transport.replay, run_id)
                    )
                )
            script = text_script(sizes.live_deltas)
            for name in LIVE[r % len(LIVE) :] + LIVE[: r % len(LIVE)]:
                transport = made[name]
                live[name].append(
                    await measure(
                        server, sizes.live_runs, functools.partial(transport.stream, script)
                    )
                )

        profiles: list[str] = []
        if py_spy is not None:  # after the measured rounds: py-spy slows the server down
            for name in REPLAYED:
                transport = made[name]
                path = out / "profiles" / f"{name}.txt"
                with profiling(py_spy, server.pid, path):
                    await measure(
                        server, replays[name], functools.partial(transport.replay, run_id)
                    )
                profiles.append(str(path))

        labels = {name: t.label for name, t in made.items()}
        return {
            "run": {"run_id": run_id, "deltas": sizes.deltas, "events": ended.events},
            "payload": payload_sizes(await first_batch(target, run_id)),
            "replay": summarize(replayed, labels),
            "live": summarize(live, labels),
            "profiles": profiles,
        }
    finally:
        for transport in made.values():
            with contextlib.suppress(Exception):
                await transport.aclose()


# -- the server -----------------------------------------------------------------------


def start_server(launcher: Launcher) -> tuple[ServerProcess, int]:
    """A Keel server on the memory store with its HTTP port: (the server, as reached on its
    HTTP port; its gRPC port)."""
    argv = ["-m", "server", "serve", "--port", "0", "--http-port", "0"]
    argv += ["--agents", SCRIPTED_AGENTS, "--log-level", "WARNING"]
    server = launcher.start_server("keel-web", argv, HTTP_READY, env={"KEEL_SHUTDOWN_GRACE_S": "0"})
    stdout = server.process.stdout
    assert stdout is not None
    watchdog = threading.Timer(30.0, server.process.kill)
    watchdog.start()
    try:
        line = stdout.readline().decode()
    finally:
        watchdog.cancel()
    if not line.startswith(GRPC_READY):
        server.stop()
        raise BenchError(f"the server did not announce its gRPC port: {line!r}")
    return server, int(line.strip().rsplit(":", 1)[1])


# -- the report -----------------------------------------------------------------------


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _us(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _times(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def table(rows: dict[str, Params], *, streams: str) -> list[str]:
    lines = [
        f"| transport | events/s | / gRPC | server CPU µs/event | / gRPC "
        f"| client CPU µs/event | / gRPC | {streams} | events/message | checks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row['label']} | {_rate(row['events_per_s'])} "
            f"| {_times(row['events_per_s_ratio'])} "
            f"| {_us(row['server_cpu_us_per_event'])} "
            f"| {_times(row['server_cpu_us_per_event_ratio'])} "
            f"| {_us(row['client_cpu_us_per_event'])} "
            f"| {_times(row['client_cpu_us_per_event_ratio'])} "
            f"| {row['streams_per_round']} | {row['events_per_message']:,.0f} "
            f"| {'ok' if row['ok'] else 'FAILED'} |"
        )
    return lines


def markdown(results: Params) -> str:
    sizes = results["sizes"]
    payload = results["payload"]
    lines = [
        f"# The HTTP port's transports against gRPC ({results['mode']} run)",
        "",
        f"{results['started']}, {results['duration_s']:.0f} s, "
        f"{results['machine']['cpus']} CPUs, load average "
        f"{results['machine']['load_before']:.2f} before, "
        f"{results['machine']['load_after']:.2f} after. "
        f"Medians of {sizes['rounds']} interleaved rounds; each ratio is the median of the "
        "rounds' ratios to gRPC's measurement of the same round.",
        "",
        f"## Replaying an ended run of {results['run']['events']:,} events from offset 0",
        "",
        *table(results["replay"], streams="replays/round"),
        "",
        f"## A live run: {sizes['live_deltas']:,} deltas streamed as they are produced (Stream)",
        "",
        *table(results["live"], streams="runs/round"),
        "",
        f"Payload of one catch-up batch ({payload['events']} events): "
        f"{payload['binary_bytes_per_event']:.0f} bytes per event in protobuf, "
        f"{payload['json_bytes_per_event']:.0f} in canonical JSON, "
        f"{payload['sse_data_bytes_per_event']:.0f} in an SSE message's data.",
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs")
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write web.json and web.md (default build/bench-web, "
        "build/bench-web-quick with --quick)",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="py-spy executable: after the rounds, record the server while each transport "
        "replays (DIR/profiles/<transport>.txt; read them with python -m bench.profiles)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out: Path = args.out or ROOT / "build" / ("bench-web-quick" if args.quick else "bench-web")
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()[0]
    begin = time.monotonic()
    launcher = Launcher(log_dir=out / "logs")
    server, grpc_port = start_server(launcher)
    try:
        deadline_s = sizes.deadline_s + (PROFILE_S if args.py_spy else 0.0)

        async def bounded() -> Params:
            async with asyncio.timeout(deadline_s - (time.monotonic() - begin)):
                return await bench(server, grpc_port, sizes, args.py_spy, out)

        measured = asyncio.run(bounded())
        warnings = server.warnings_since(0)
    finally:
        server.stop()
    results: Params = {
        "mode": "quick" if args.quick else "full",
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": time.monotonic() - begin,
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "python": sys.version.split()[0],
        },
        "sizes": asdict(sizes),
        **measured,
        "server_warnings": warnings[:10],
    }
    results["ok"] = all(
        row["ok"] for section in ("replay", "live") for row in results[section].values()
    )
    (out / "web.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results)
    (out / "web.md").write_text(report)
    print(report)
    print(f"wrote {out / 'web.json'} and {out / 'web.md'}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
