"""`python -m server serve [--port P] [--host H] [--redis-url URL] [--agents module:attr]`.

Flags override KEEL_* environment variables (see server/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from pydantic import ValidationError

from server.app import serve
from server.settings import Settings

_FLAGS = ("host", "port", "redis_url", "agents", "key_prefix", "tasks_global_concurrency")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the Keel gRPC server")
    run.add_argument("--host", help="address to bind (default 127.0.0.1; KEEL_HOST)")
    run.add_argument("--port", type=int, help="port to bind, 0 for any (default 50051; KEEL_PORT)")
    run.add_argument("--redis-url", help="Redis for durable runs, e.g. redis://127.0.0.1:6379/0")
    run.add_argument("--agents", help="agent registry as module:attr")
    run.add_argument("--key-prefix", help="prefix of every Redis key (default keel)")
    run.add_argument(
        "--tasks-global-concurrency",
        type=int,
        help="background tasks running at once across every server sharing the store "
        "(default 10; KEEL_TASKS_GLOBAL_CONCURRENCY)",
    )
    run.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{exc}")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
