"""Keel's command line.

    python -m server serve [--port P] [--host H] [--redis-url URL] [--agents module:attr]
                           [--workers N] [--executor local|temporal]
                           [--temporal-address H:P] [--temporal-namespace N] [--task-queue Q]
    python -m server worker --temporal-address H:P --redis-url URL --agents module:attr
                            [--temporal-namespace N] [--task-queue Q]
    python -m server keys add --file F --tenant T --role reader|runner|admin

`serve` runs the gRPC server; with `--workers N` (Redis only) a parent runs N
server processes on the one port (server/workers.py). `worker` runs a Temporal
worker that executes the runs of servers started with `--executor temporal`;
`keys add` prints a new API key and stores only its hash in the keys file F.
Flags override KEEL_* environment variables (see server/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server import logs, process
from server.auth.keys import KeysFileError, Role, add_key
from server.settings import ConfigurationError, Settings, check_settings
from server.workers import WorkersError, check_workers, run_workers, settings_from_parent

_FLAGS = (
    "host",
    "port",
    "workers",
    "redis_url",
    "postgres_url",
    "redis_wait_replicas",
    "agents",
    "key_prefix",
    "tasks_global_concurrency",
    "executor",
    "temporal_address",
    "temporal_namespace",
    "task_queue",
    "log_level",
    "log_format",
    "metrics_port",
    "api_keys_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "http_port",
    "http_cors_origins",
)


def _add_common(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--redis-url",
        help="Redis for durable runs, e.g. redis://127.0.0.1:6379/0, or a Redis Cluster "
        "by any one of its nodes: redis+cluster://127.0.0.1:7000",
    )
    command.add_argument(
        "--postgres-url",
        help="PostgreSQL for durable runs instead of Redis, e.g. "
        "postgresql://keel@127.0.0.1:5432/keel (its schema is migrated at start)",
    )
    command.add_argument(
        "--redis-wait-replicas",
        type=int,
        help="replicas that must acknowledge every append (Redis WAIT; default 0: none; "
        "KEEL_REDIS_WAIT_REPLICAS, with KEEL_REDIS_WAIT_TIMEOUT_MS)",
    )
    command.add_argument("--agents", help="agent registry as module:attr")
    command.add_argument("--key-prefix", help="prefix of every Redis key (default keel)")
    command.add_argument(
        "--tasks-global-concurrency",
        type=int,
        help="background tasks running at once across every server sharing the store "
        "(default 10; KEEL_TASKS_GLOBAL_CONCURRENCY)",
    )
    command.add_argument(
        "--temporal-address", help="Temporal frontend host:port (default 127.0.0.1:7233)"
    )
    command.add_argument("--temporal-namespace", help="Temporal namespace (default default)")
    command.add_argument("--task-queue", help="Temporal task queue of runs (default keel-runs)")
    command.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (KEEL_METRICS_PORT)",
    )
    command.add_argument("--log-level", help="lowest level logged (default INFO; KEEL_LOG_LEVEL)")
    command.add_argument(
        "--log-format",
        choices=("json", "text"),
        help="JSON lines (default) or text (KEEL_LOG_FORMAT)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the Keel gRPC server")
    run.add_argument("--host", help="address to bind (default 127.0.0.1; KEEL_HOST)")
    run.add_argument("--port", type=int, help="port to bind, 0 for any (default 50051; KEEL_PORT)")
    run.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port, e.g. one per core; more than 1 needs "
        "--redis-url (default 1; KEEL_WORKERS)",
    )
    # Internal: a worker of the `serve --workers` parent with this pid (server/workers.py).
    run.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    run.add_argument(
        "--executor",
        choices=("local", "temporal"),
        help="who executes runs: this process (local, the default) or Temporal workers",
    )
    run.add_argument("--api-keys-file", help="require API keys from this file (KEEL_API_KEYS_FILE)")
    run.add_argument("--tls-cert-file", help="the server's TLS certificate (PEM)")
    run.add_argument("--tls-key-file", help="the server's TLS key (PEM)")
    run.add_argument(
        "--tls-client-ca-file", help="require client certificates signed by this CA (mTLS)"
    )
    run.add_argument(
        "--http-port",
        type=int,
        help="also serve AgentService over Connect and gRPC-Web, a run's events as Server-Sent "
        "Events and the console (/console) on this HTTP port, 0 for any (KEEL_HTTP_PORT)",
    )
    run.add_argument(
        "--http-cors-origins",
        help="origins whose pages may call the HTTP port, comma-separated, * for any "
        "(KEEL_HTTP_CORS_ORIGINS)",
    )
    _add_common(run)
    worker = commands.add_parser("worker", help="run a Temporal worker that executes runs")
    _add_common(worker)
    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    add = key_commands.add_parser(
        "add", help="make a key: print it, and store only its hash in the keys file"
    )
    add.add_argument("--file", required=True, type=Path, help="the keys file (made if missing)")
    add.add_argument("--tenant", required=True, help="the tenant the key acts for")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    return parser


def _add_key(file: Path, tenant: str, role: str) -> None:
    try:
        key = add_key(file, tenant, Role(role))
    except (ValueError, KeysFileError) as exc:
        sys.exit(f"keys add: {exc}")
    print(key)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        _add_key(args.file, args.tenant, args.role)
        return
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None
    }
    if args.command == "worker":
        overrides["executor"] = "temporal"
    worker_of: int | None = getattr(args, "worker_of", None)
    try:
        if worker_of is not None:
            settings = settings_from_parent(worker_of)
        else:
            settings = Settings(**overrides)
        check_settings(settings)
        if args.command == "serve":
            check_workers(settings)
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{exc}")
    except ConfigurationError as exc:
        sys.exit(f"invalid settings: {exc}")
    except WorkersError as exc:
        sys.exit(f"serve: {exc}")
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "serve" and settings.workers > 1:
        try:
            sys.exit(run_workers(settings))
        except WorkersError as exc:
            sys.exit(f"serve: {exc}")
    # Imported here, not above: the parent of `serve --workers` runs no server, and
    # importing one (gRPC, pydantic-ai, ...) would cost it about 70 MB.
    from server.app import load_agents, serve

    if args.command == "serve":
        # One process: the server (a worker of `serve --workers` shares the port).
        try:
            process.run(serve(settings, reuse_port=worker_of is not None), settings.event_loop)
        except ConfigurationError as exc:  # found at start-up: the HTTP port is taken, ...
            sys.exit(f"serve: {exc}")
    else:
        from server.temporal.worker import work

        asyncio.run(work(settings, load_agents(settings)))
    if settings.executor == "temporal":
        # The temporalio runtime may abort at interpreter exit (temporalio/sdk-python#300):
        # the process shut down cleanly, so leave without the interpreter's teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
