"""Keel's settings: flags override KEEL_* environment variables, which override defaults."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.auth.keys import KeyRing, KeysFileError
from server.events.urls import is_cluster_url


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(BaseSettings):
    """Every knob of a Keel server. Environment variables are KEEL_<FIELD>, e.g. KEEL_REDIS_URL."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    # `serve` only: server processes sharing the port (SO_REUSEPORT among the workers of
    # one parent, server/workers.py); more than 1 needs redis_url. 1: one process, no parent.
    workers: int = Field(default=1, ge=1, le=512)
    # Redis for the event log and run records; empty: the in-memory log (one process,
    # no durability).
    redis_url: str = ""
    # PostgreSQL instead (postgresql://user@host:port/db; docs/postgres.md): the same
    # store in tables, its schema migrated at start. One of redis_url and postgres_url.
    postgres_url: str = ""
    # Prefix of every Redis key, so several deployments (or tests) can share one Redis;
    # on PostgreSQL, the schema Keel's tables live in.
    key_prefix: str = "keel"
    # With replicas: every append of events waits (Redis WAIT) until this many replicas
    # acknowledged it, at most redis_wait_timeout_ms; an append they do not acknowledge in
    # time fails as if Redis were unreachable. 0: no waiting (asynchronous replication).
    # A single Redis only (redis://), not a cluster.
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, le=60_000)
    # Registry of agents: "module:attr" naming a mapping of agent id -> Agent or AgentSpec.
    agents: str = ""
    # An OpenAI-compatible provider: given a base URL and a model name, agent "assistant"
    # serves it.
    model_base_url: str = ""
    model_api_key: str = ""
    model_name: str = ""

    # How long a terminal run's events and record are kept; live runs never expire.
    terminal_ttl_s: float = Field(default=86_400.0, gt=0)
    # Keep at most this many events per run (older ones are trimmed); 0 keeps all.
    retain_events: int = Field(default=0, ge=0)
    # A thread without an active run is deleted after this long; 0 keeps threads until
    # DeleteThread.
    thread_idle_ttl_s: float = Field(default=0.0, ge=0)

    # Observe: heartbeat on streams quiet for this long.
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    # Observe: live batches an observer may have queued before it is demoted to catch-up.
    observer_queue_size: int = Field(default=256, ge=1)
    # Observe: events per catch-up read from the log.
    catch_up_page_size: int = Field(default=1000, ge=1)
    # Observe: catch-up page reads this server makes at once; streams catching up beyond
    # that wait their turn (FIFO), a page at a time, so a crowd of observers rejoining
    # does not starve the runs producing events.
    catch_up_concurrency: int = Field(default=4, ge=1)
    # Largest gRPC message of events the server sends (clients accept 4 MiB by default).
    max_batch_bytes: int = Field(default=1 << 20, ge=1024)

    # Writer: most events per append (one Lua call on Redis).
    write_batch_max: int = Field(default=1000, ge=1)
    # Writer: a run that flushed less than this ago waits this long before its next flush,
    # so a fast producer's events travel in batches; a slow one's are not delayed.
    write_linger_ms: float = Field(default=2.0, ge=0)
    # Writer: events a run may have emitted but not committed before it waits.
    write_pending_max: int = Field(default=5000, ge=1)

    # Ownership: a run's owner renews its lease; when it lapses another instance takes over.
    lease_ttl_s: float = Field(default=5.0, gt=0)
    # How often every instance looks for runs whose lease lapsed (also once at start).
    sweep_interval_s: float = Field(default=1.0, gt=0)
    # CancelRun waits at most this long for the run's owner to abort it.
    cancel_wait_s: float = Field(default=10.0, ge=0)

    # Background tasks: how many run at once across every server sharing the store.
    tasks_global_concurrency: int = Field(default=10, ge=1, le=100_000)
    # Background tasks: an attempt running longer than this fails (a tool's own
    # timeout_s wins).
    tasks_default_timeout_s: float = Field(default=300.0, gt=0, le=7 * 86_400)
    # Background tasks: the wait before a failed attempt's first retry; it doubles with
    # each retry, up to tasks_retry_backoff_max_s.
    tasks_retry_backoff_s: float = Field(default=1.0, ge=0, le=3600)
    tasks_retry_backoff_max_s: float = Field(default=60.0, ge=0, le=86_400)
    # Background tasks: how often each server looks for queued tasks others could not
    # start (a task queued or a slot freed on this server is started at once).
    tasks_poll_interval_s: float = Field(default=0.5, gt=0, le=60)

    # Schedules: how often each server looks for due schedules at the latest (it also
    # wakes when the earliest one is due, and when one is created or changed here).
    schedules_poll_interval_s: float = Field(default=1.0, gt=0, le=60)

    # Who executes runs: "local" (this process; Redis leases hand runs between replicas)
    # or "temporal" (a Temporal workflow per run, executed by `python -m server worker`
    # processes; needs redis_url).
    executor: Literal["local", "temporal"] = "local"
    # Temporal: the frontend's host:port, the namespace, and the task queue workers poll.
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "keel-runs"
    # Temporal: a worker that stops heartbeating a run for this long is presumed dead,
    # and the run's activity is retried on another worker (which takes the run over).
    temporal_heartbeat_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    # Temporal workers: one activity per model request and one per step's tool calls
    # (true), or one activity that runs the run until it ends or waits (false: no
    # activity round trip per step, at the price of Temporal seeing less of the run).
    temporal_half_steps: bool = True

    # Authentication: a keys file made by `python -m server keys add` (only hashes); with
    # it every AgentService call needs `authorization: Bearer <key>`. Empty, and no client
    # CA: the server is open (local development).
    api_keys_file: str = ""
    # TLS: the server's certificate chain and key (PEM files); with a client CA as well,
    # clients must present a certificate it signed (mutual TLS; the certificate's common
    # name is the caller's tenant and its organizational unit the role).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""

    # Prometheus metrics at http://host:metrics_port/metrics (server/metrics.py); unset: off,
    # 0: any free port.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    # The HTTP port (server/web/): AgentService over Connect and gRPC-Web, a run's events as
    # Server-Sent Events at /v1/runs/{run_id}/events, and the console at /console; unset:
    # off, 0: any free port. Pages of other origins may call it only from the origins
    # listed here (comma-separated, "*": any). The console's built files: console_dir
    # (default: console/dist of this repository).
    http_port: int | None = Field(default=None, ge=0, le=65535)
    http_cors_origins: str = ""
    console_dir: str = ""
    # A2A (docs/a2a.md): the agent of the HTTP port's /.well-known/agent-card.json and of
    # A2A gRPC requests that name none; "": the registry's first agent.
    a2a_default_agent: str = ""
    # A2A push notifications: a delivery waits a2a_push_timeout_s for a 2xx answer; a failed
    # one is retried after a2a_push_retry_initial_ms, doubling up to a2a_push_retry_max_ms,
    # for as long as the task is kept. Targets must be public addresses unless
    # a2a_push_allow_private (receivers on the operator's own network, tests).
    a2a_push_timeout_s: float = Field(default=10.0, gt=0, le=300)
    a2a_push_retry_initial_ms: int = Field(default=1000, ge=1)
    a2a_push_retry_max_ms: int = Field(default=60_000, ge=1)
    a2a_push_allow_private: bool = False

    # Logs: the lowest level written, and JSON lines (one object per record) or text.
    log_level: str = Field(default="INFO", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: Literal["json", "text"] = "json"

    # The server's event loop: uvloop (libuv, the default) or the standard asyncio loop
    # (server/process.py).
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    # Health: how often the server pings its store; NOT_SERVING while it cannot reach it.
    health_check_interval_s: float = Field(default=1.0, gt=0, le=60)

    # Connections (gRPC server options). Keepalive: ping an idle connection every
    # grpc_keepalive_time_s and drop it if no answer comes within grpc_keepalive_timeout_s.
    grpc_keepalive_time_s: float = Field(default=60.0, gt=0)
    grpc_keepalive_timeout_s: float = Field(default=20.0, gt=0)
    # Close connections older than this (GOAWAY), so clients spread over new replicas;
    # streams in flight get grpc_max_connection_age_grace_s to end, then end with
    # UNAVAILABLE and clients resume them. 0: connections live as long as they like.
    grpc_max_connection_age_s: float = Field(default=0.0, ge=0)
    grpc_max_connection_age_grace_s: float = Field(default=30.0, ge=0)
    # Concurrent streams per connection (0: gRPC's default) and message size limits.
    grpc_max_concurrent_streams: int = Field(default=0, ge=0)
    grpc_max_receive_message_bytes: int = Field(default=4 << 20, ge=1024)
    grpc_max_send_message_bytes: int = Field(default=4 << 20, ge=1024)

    # SIGTERM: time given to runs in progress to finish before the process exits;
    # runs still going then are handed back (their leases released) to other instances.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # This process's name as a run owner.
    instance_id: str = Field(default_factory=_default_instance_id)


class ConfigurationError(Exception):
    """Settings that cannot work together."""


def check_settings(settings: Settings) -> KeyRing | None:
    """ConfigurationError for settings that cannot work together; the API keys."""
    if settings.redis_url and settings.postgres_url:
        raise ConfigurationError(
            "give one store: --redis-url (KEEL_REDIS_URL) or --postgres-url "
            "(KEEL_POSTGRES_URL), not both"
        )
    if settings.postgres_url and not settings.postgres_url.startswith(
        ("postgresql://", "postgres://")
    ):
        raise ConfigurationError(
            "--postgres-url (KEEL_POSTGRES_URL) must look like "
            "postgresql://user:password@host:port/database"
        )
    if settings.executor == "temporal" and not settings.redis_url:
        raise ConfigurationError(
            "the temporal executor needs Redis for the event log: give --redis-url "
            "(KEEL_REDIS_URL); workers and API servers must share it"
        )
    if settings.redis_wait_replicas and is_cluster_url(settings.redis_url):
        raise ConfigurationError(
            "--redis-wait-replicas (KEEL_REDIS_WAIT_REPLICAS) needs a single Redis (redis://); "
            "a cluster's nodes each have their own replicas"
        )
    if settings.redis_wait_replicas and not settings.redis_url:
        raise ConfigurationError("--redis-wait-replicas needs Redis: give --redis-url")
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ConfigurationError("TLS needs both a certificate and a key file")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        raise ConfigurationError("mutual TLS (a client CA) needs the server's TLS certificate")
    if (
        settings.http_port is not None
        and settings.tls_client_ca_file
        and not settings.api_keys_file
    ):
        raise ConfigurationError(
            "the HTTP port (--http-port) authenticates callers by API key only, not by client "
            "certificate: give --api-keys-file too"
        )
    return load_keys(settings)


def load_keys(settings: Settings) -> KeyRing | None:
    """The API keys of the keys file, or None without one (ConfigurationError if unusable)."""
    if not settings.api_keys_file:
        return None
    try:
        return KeyRing.load(Path(settings.api_keys_file))
    except KeysFileError as exc:
        raise ConfigurationError(str(exc)) from exc
