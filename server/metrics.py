"""Keel's Prometheus metrics (prometheus-client), and the HTTP endpoint that serves them.

Every metric Keel exports is defined here, with its meaning; docs/operations.md
lists them with an alert worth setting on each. They live in prometheus-
client's default registry (so a process exports them once, whatever
creates them), and `serve_metrics` exposes that registry at
http://host:port/metrics when KEEL_METRICS_PORT is set.

Counters count what this process did: sum them over replicas.
"""

from __future__ import annotations

import asyncio
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

RUNS_STARTED = Counter("keel_runs_started", "Runs stored by StartRun/Stream/schedules.", ["agent"])
RUNS_ENDED = Counter(
    "keel_runs_ended", "Runs that ended, by the state they ended in.", ["agent", "state"]
)
RUNS_ACTIVE = Gauge("keel_runs_active", "Runs this process is executing now.")
STREAMS_OPEN = Gauge("keel_streams_open", "Server-streaming RPCs open now.", ["rpc"])
EVENTS_APPENDED = Counter("keel_events_appended", "Events appended to the event log.")
APPEND_BATCH = Histogram(
    "keel_append_batch_events", "Events per append to the event log.", buckets=_BATCH_BUCKETS
)
EVENTS_SERVED = Counter(
    "keel_events_served",
    "Events sent to clients, by where they came from: the live path or the log.",
    ["source"],
)
# Bound once: these count on every batch a stream sends.
EVENTS_SERVED_LIVE = EVENTS_SERVED.labels("live")
EVENTS_SERVED_LOG = EVENTS_SERVED.labels("log")
CATCH_UP_PAGES = Counter("keel_catch_up_pages", "Pages of events read from the log for streams.")
CATCH_UP_PAGES_SHARED = Counter(
    "keel_catch_up_pages_shared",
    "Pages of events a stream took from the pages another stream of this server had just "
    "read, instead of reading the log.",
)
CATCH_UP_READS_WAITING = Gauge(
    "keel_catch_up_reads_waiting",
    "Catch-up page reads waiting now for one of the server's catch-up slots "
    "(KEEL_CATCH_UP_CONCURRENCY).",
)
CATCH_UP_READS_WAITED = Counter(
    "keel_catch_up_reads_waited",
    "Catch-up page reads that had to wait for a catch-up slot.",
)
OBSERVERS_DEMOTED = Counter(
    "keel_observers_demoted",
    "Streams that fell behind the live path (queue full, lost notifications) and went "
    "back to reading the log.",
)
TAKEOVERS = Counter(
    "keel_takeovers", "Runs this process took over from another owner (a new epoch)."
)
FENCED_WRITES = Counter(
    "keel_fenced_writes", "Writes refused because another owner took the run over."
)
RESUMES = Counter("keel_resumes", "Resume calls, by outcome (OK or a gRPC code).", ["outcome"])
TASKS_STARTED = Counter("keel_tasks_started", "Background task attempts started here.")
TASKS_ENDED = Counter("keel_tasks_ended", "Background task attempts that ended here.", ["status"])
TASKS_RUNNING = Gauge("keel_tasks_running", "Background task attempts running here now.")
SCHEDULE_FIRINGS = Counter(
    "keel_schedule_firings", "Schedule ticks decided here, by outcome.", ["outcome"]
)
ASYNCIO_TASKS = Gauge(
    "keel_asyncio_tasks",
    "asyncio tasks not done yet in this process's event loop (counted at each scrape).",
)
RPC_DURATION = Histogram(
    "keel_rpc_duration_seconds",
    "AgentService RPCs and A2A calls (method a2a.<operation>): time to the end of the call "
    "(of the stream, for streaming RPCs).",
    ["method", "code"],
    buckets=_RPC_BUCKETS,
)


class MetricsServer:
    """The /metrics endpoint (prometheus-client's HTTP server in a thread of its own)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(host: str, port: int) -> MetricsServer:
    """Serve every metric at http://host:port/metrics (port 0: any free port).

    Called inside the process's event loop, it also has keel_asyncio_tasks count
    that loop's tasks."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        count_tasks(loop)
    server, thread = start_http_server(port, addr=host)
    return MetricsServer(server, thread)


def count_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Make keel_asyncio_tasks the number of `loop`'s pending tasks, read at each scrape.

    The scrape runs in the endpoint's thread: asyncio.all_tasks copies the
    task set with a retry when another thread changes it meanwhile, and
    reading whether a task is done is a plain attribute read."""
    ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))
