"""Assembles a Keel server: event log, executor, servicer, health, reflection; and its shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import tracing
from server.a2a import cards as a2a_cards
from server.a2a import service as a2a_service
from server.a2a.handler import KeelRequestHandler
from server.a2a.push.dispatcher import Dispatcher
from server.a2a.push.factory import push_store_for
from server.a2a.push.sender import Sender
from server.a2a.web import A2AApplication, is_a2a_path
from server.agents.registry import load_registry
from server.agents.types import AgentSpec
from server.api.servicer import SERVICE, AgentServicer, add_to_server
from server.auth.gate import A2A_METHOD_ROLES, A2A_SERVICE, AuthInterceptor, Gate
from server.errors import SchemaTooNew, StoreUnavailable
from server.events.factory import open_event_log
from server.events.log import EventLog
from server.goals.judge import check_default_goals
from server.health import StoreHealth
from server.metrics import MetricsServer, serve_metrics
from server.observe.follow import FollowLimits
from server.observe.observer import Draining
from server.process import HTTP_LISTENING, LISTENING
from server.runs.executor import LocalExecutor, Timing
from server.runs.executors import Executor
from server.runs.supervisor import WriterLimits
from server.schedules.factory import schedule_store_for
from server.schedules.service import Schedules
from server.schedules.ticker import Ticker
from server.settings import ConfigurationError, Settings, check_settings
from server.tasks.factory import task_store_for
from server.tasks.runner import TaskLimits
from server.web.console import DEFAULT_DIR as CONSOLE_DIR
from server.web.console import Console
from server.web.routes import WebApplication
from server.web.server import HttpServer, bind, start_http

log = logging.getLogger(__name__)

SERVICE_NAME = SERVICE.full_name
ASSISTANT_AGENT_ID = "assistant"


@dataclass
class Keel:
    """A running Keel server and what it owns. `stop()` is safe to call more than once."""

    server: grpc.aio.Server
    port: int
    settings: Settings
    log: EventLog
    executor: Executor
    ticker: Ticker
    health: health.aio.HealthServicer
    draining: Draining
    store_health: StoreHealth
    metrics_server: MetricsServer | None = None
    http: HttpServer | None = None
    push: Dispatcher | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown, in this order:

        1. health says NOT_SERVING, so load balancers stop sending;
        2. open streams end with UNAVAILABLE (clients resume on another replica);
        3. the listeners (gRPC, HTTP) close and unary calls in flight get a second
           to finish;
        4. runs in progress get shutdown_grace_s to finish, then are handed back
           (leases released) for another instance to take over;
        5. the event log closes.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.store_health.close()
        await self.health.enter_graceful_shutdown()
        self.draining.set()
        stopping_http = asyncio.ensure_future(self.http.stop()) if self.http else None
        await self.server.stop(grace=1.0)
        if stopping_http is not None:
            await stopping_http
        await self.ticker.drain()
        await self.executor.drain(grace)
        await self.executor.task_store.close()
        if self.push is not None:
            await self.push.close()
        await self.log.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def load_agents(settings: Settings) -> dict[str, AgentSpec]:
    agents: dict[str, AgentSpec] = {}
    if settings.agents:
        agents.update(load_registry(settings.agents))
    if settings.model_base_url and settings.model_name:
        from server.agents.openai_compat import build_openai_agent

        agents[ASSISTANT_AGENT_ID] = build_openai_agent(
            base_url=settings.model_base_url,
            api_key=settings.model_api_key,
            model_name=settings.model_name,
        )
    check_default_goals(agents)
    return agents


def server_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The gRPC server's options: connection management from the settings.

    `reuse_port` is for the workers of one `serve --workers` parent only
    (server/workers.py): they bind the port the parent reserved, with SO_REUSEPORT.
    """

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = [
        # No SO_REUSEPORT: a second server on a port still held by a draining one
        # must fail to bind, not silently split that port's connections with it
        # (unless this is one of the workers of one parent, which share its port).
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_time_ms", ms(settings.grpc_keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(settings.grpc_keepalive_timeout_s)),
        # Clients may keep idle connections alive with pings, every 10 s at most
        # (more often counts as abuse, and gRPC closes the connection).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_receive_message_length", settings.grpc_max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_send_message_bytes),
    ]
    if settings.grpc_max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", ms(settings.grpc_max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(settings.grpc_max_connection_age_grace_s)),
        ]
    if settings.grpc_max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams))
    return options


def exposed(host: str) -> bool:
    """Does binding `host` accept connections from other machines?"""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: assume it resolves to a reachable address


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from exc


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Listen on host:port, with TLS (and client certificates) when configured."""
    address = f"{settings.host}:{settings.port}"
    if not settings.tls_cert_file:
        return server.add_insecure_port(address)
    ca = _read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    credentials = grpc.ssl_server_credentials(
        [(_read(settings.tls_key_file), _read(settings.tls_cert_file))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )
    return server.add_secure_port(address, credentials)


async def create_server(settings: Settings, *, reuse_port: bool = False) -> Keel:
    """A started Keel server on settings.host:settings.port (port 0 picks a free port);
    `reuse_port`: one of the workers of `serve --workers` (see server_options)."""
    keys = check_settings(settings)
    agents = load_agents(settings)
    try:
        event_log = await open_event_log(
            settings.redis_url or None,
            postgres_url=settings.postgres_url or None,
            key_prefix=settings.key_prefix,
            terminal_ttl_s=settings.terminal_ttl_s,
            retain_events=settings.retain_events,
            lease_ttl_s=settings.lease_ttl_s,
            thread_idle_ttl_s=settings.thread_idle_ttl_s,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
    except StoreUnavailable as exc:
        # At start there is nothing to serve yet: say so once and stop (a supervisor
        # restarts the process; the server does not spin on an unreachable store).
        raise ConfigurationError(f"cannot reach the store at start: {exc}") from exc
    except SchemaTooNew as exc:  # migrated by a newer Keel: refuse to start
        raise ConfigurationError(str(exc)) from exc
    task_limits = TaskLimits(
        global_concurrency=settings.tasks_global_concurrency,
        default_timeout_s=settings.tasks_default_timeout_s,
        retry_backoff_s=settings.tasks_retry_backoff_s,
        retry_backoff_max_s=settings.tasks_retry_backoff_max_s,
        poll_interval_s=settings.tasks_poll_interval_s,
        sweep_interval_s=settings.sweep_interval_s,
        lease_ttl_s=settings.lease_ttl_s,
    )
    task_store = task_store_for(event_log, lease_ttl_s=settings.lease_ttl_s)
    timing = Timing(
        # A third of the TTL: a renewal may fail twice before the lease lapses.
        lease_renew_interval_s=settings.lease_ttl_s / 3,
        sweep_interval_s=settings.sweep_interval_s,
        cancel_wait_s=settings.cancel_wait_s,
    )
    executor: Executor
    if settings.executor == "temporal":
        from server.temporal.engine import Engine
        from server.temporal.executor import TemporalExecutor
        from server.temporal.worker import engine_config

        executor = TemporalExecutor(
            event_log,
            agents,
            Engine(engine_config(settings)),
            instance_id=settings.instance_id,
            task_store=task_store,
            timing=timing,
        )
    else:
        executor = LocalExecutor(
            event_log,
            agents,
            task_store=task_store,
            task_limits=task_limits,
            instance_id=settings.instance_id,
            limits=WriterLimits(
                settings.write_batch_max,
                settings.write_pending_max,
                linger_s=settings.write_linger_ms / 1000,
            ),
            timing=timing,
        )
    schedule_store = schedule_store_for(event_log)
    ticker = Ticker(
        schedule_store,
        event_log,
        executor,
        poll_interval_s=settings.schedules_poll_interval_s,
    )
    draining = Draining()
    follow_limits = FollowLimits(
        page_size=settings.catch_up_page_size,
        queue_size=settings.observer_queue_size,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        catch_up_concurrency=settings.catch_up_concurrency,
    )
    servicer = AgentServicer(
        event_log,
        executor,
        limits=follow_limits,
        max_batch_bytes=settings.max_batch_bytes,
        draining=draining,
        default_retention_s=settings.terminal_ttl_s,
        schedules=Schedules(schedule_store, event_log, executor, ticker),
    )
    if tracing.provider() is None:
        traced = tracing.from_environment()
        if traced is not None:
            tracing.enable(traced)
    client_certificates = bool(settings.tls_client_ca_file)
    if keys is None and not client_certificates and exposed(settings.host):
        log.warning(
            "no API keys and no client certificates: anyone who reaches %s may read and "
            "start every run (set KEEL_API_KEYS_FILE)",
            settings.host,
        )
    gate = Gate(keys, client_certificates=client_certificates)
    a2a_agent = a2a_cards.default_agent(agents, settings.a2a_default_agent)
    if settings.a2a_default_agent and a2a_agent not in agents:
        raise ConfigurationError(
            f"a2a_default_agent (KEEL_A2A_DEFAULT_AGENT) {a2a_agent!r} is not an agent of "
            "the registry"
        )
    a2a_handler = KeelRequestHandler(
        event_log,
        executor,
        limits=follow_limits,
        draining=draining,
        default_agent=a2a_agent,
        push_allow_private=settings.a2a_push_allow_private,
    )
    push = Dispatcher(
        event_log,
        push_store_for(event_log),
        Sender(
            timeout_s=settings.a2a_push_timeout_s, allow_private=settings.a2a_push_allow_private
        ),
        a2a_handler.task_of,
        instance_id=settings.instance_id,
        hold_ms=max(1, round(settings.lease_ttl_s * 1000)),
        sweep_interval_s=settings.sweep_interval_s,
        retry_initial_ms=settings.a2a_push_retry_initial_ms,
        retry_max_ms=max(settings.a2a_push_retry_max_ms, settings.a2a_push_retry_initial_ms),
        retention_ms=round(settings.terminal_ttl_s * 1000),
    )
    a2a_handler.push = push
    server = grpc.aio.server(
        interceptors=[
            *tracing.server_interceptors(),
            AuthInterceptor(gate),
            AuthInterceptor(gate, service=A2A_SERVICE, roles=A2A_METHOD_ROLES),
        ],
        options=server_options(settings, reuse_port=reuse_port),
    )
    add_to_server(servicer, server)
    a2a_service.add_to_server(a2a_handler, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = _bind(server, settings)
    http_socket = None
    if settings.http_port is not None:
        try:
            http_socket = bind(settings.host, settings.http_port, reuse_port=reuse_port)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot bind the HTTP port {settings.host}:{settings.http_port}: {exc.strerror}"
            ) from exc
    metrics_server = None
    if settings.metrics_port is not None:
        metrics_server = serve_metrics(settings.host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.host, metrics_server.port)
    await server.start()
    http = None
    if http_socket is not None:
        web = WebApplication(
            servicer,
            gate,
            cors_origins=[o.strip() for o in settings.http_cors_origins.split(",") if o.strip()],
            console=Console(Path(settings.console_dir) if settings.console_dir else CONSOLE_DIR),
            read_max_bytes=settings.grpc_max_receive_message_bytes,
            a2a=A2AApplication(
                a2a_handler,
                gate,
                cards=lambda agent_id, base: a2a_cards.card(
                    agent_id,
                    agents[agent_id],
                    http_base=base,
                    grpc_target=f"{base.split('://', 1)[1].rsplit(':', 1)[0]}:{port}",
                    secured=not gate.open,
                ),
                default_agent=a2a_agent,
                read_max_bytes=settings.grpc_max_receive_message_bytes,
            ),
            is_a2a_path=is_a2a_path,
        )
        http = await start_http(
            web,
            http_socket,
            grace_s=1.0,
            tls_cert_file=settings.tls_cert_file,
            tls_key_file=settings.tls_key_file,
        )
        log.info("http (Connect, gRPC-Web, SSE, console, A2A) on %s:%d", settings.host, http.port)
    executor.open()  # take over runs whose owner died, from now on
    ticker.open()  # fire due schedules, from now on
    push.open()  # deliver push notifications, from now on
    store_health = StoreHealth(
        health_servicer,
        event_log,
        ("", SERVICE_NAME),
        interval_s=settings.health_check_interval_s,
    )
    await store_health.check()  # SERVING, unless the store is unreachable already
    store_health.open()
    log.info(
        "keel serving on %s:%d (%s, %s executor)",
        settings.host,
        port,
        "redis" if settings.redis_url else "postgres" if settings.postgres_url else "memory",
        settings.executor,
    )
    return Keel(
        server,
        port,
        settings,
        event_log,
        executor,
        ticker,
        health_servicer,
        draining,
        store_health,
        metrics_server,
        http,
        push,
    )


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    keel = await create_server(settings, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []  # keeps the shutdown task referenced
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(asyncio.create_task(keel.stop())))
    if keel.http is not None:
        print(f"{HTTP_LISTENING}{settings.host}:{keel.http.port}", flush=True)
    print(f"{LISTENING}{settings.host}:{keel.port}", flush=True)
    await keel.wait_stopped()
