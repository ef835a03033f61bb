"""`python -m bench [--quick] [--out DIR] ...`: measure Keel and its ceilings, write the report.

scripts/bench is the documented way in; see docs/perf/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import analysis, mastra, report
from bench.procs import ROOT, Launcher
from bench.runner import ALL_BACKENDS, BACKENDS, WORKLOADS, Run
from bench.sizes import FULL, QUICK, Sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny workloads: proves the benchmark runs (CI)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write the report (default docs/perf; build/bench-quick with --quick)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated: memory, redis, temporal (the Temporal executor on Redis; "
        "workloads a, b and f); default those three. Also, never by default, what runs on "
        "redis on other stores: redis-aof-everysec and redis-aof-always (a redis-server "
        "with an append-only file, appendfsync everysec or always), cluster (a 3-master "
        "Redis Cluster); each store's raw Redis ceiling is measured too. And postgres: "
        "Keel on a PostgreSQL server of the benchmark's own (--postgres-url; workloads a, "
        "b and d), with the raw PostgreSQL ceiling (bare INSERTs and reads); postgres-sync: "
        "the same on one whose commits wait for their WAL flush (fsync, synchronous_commit "
        "on)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="workload letters to run, e.g. 'ad' (default all: abcdefghi; b and h include "
        "their workers comparisons)",
    )
    parser.add_argument(
        "--keel-root",
        type=Path,
        default=ROOT,
        help="measure the server of another checkout (an A/B comparison); default this repo",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="py-spy executable: record each Keel server while measured (build/bench/*/profiles)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only rewrite latest.md and latest.png from a run's JSON",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="JSON",
        help="a previous run's latest.json: the report shows its figures as 'before' columns",
    )
    parser.add_argument(
        "--mastra",
        type=Path,
        metavar="DIR",
        help="the results directory of the Mastra peer harness (Mastra's durable-agent "
        "benchmark, a Node project; its JSON files are described in docs/perf/README.md): "
        "the report shows its figures next to Keel's",
    )
    return parser


def _extras(args: argparse.Namespace, results: dict[str, Any], sizes: Sizes) -> None:
    """Add Mastra's figures and the baseline (when asked for), then everything derived."""
    if args.mastra is not None:
        if not args.mastra.is_dir():
            sys.exit(f"--mastra: {args.mastra} is not a directory")
        results["mastra"] = mastra.load(
            args.mastra.resolve(), sizes.stream_deltas, sizes.many_runs, sizes.many_deltas
        )
    if args.baseline is not None:
        baseline = json.loads(args.baseline.read_text())
        results["baseline"] = analysis.before(baseline, str(args.baseline), results.get("mastra"))
    results.update(analysis.derive(results))


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return done.stdout.strip()


def _keel_version(root: Path) -> str:
    commit = _git(root, "rev-parse", "--short", "HEAD")
    if not commit:
        return f"{root} (not a git checkout)"
    changed = _git(root, "status", "--porcelain", "--", "server", "clients/python", "proto")
    dirty = " + uncommitted changes in server, clients/python or proto" if changed else ""
    return f"{commit}{dirty}"


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    out: Path = args.out or (ROOT / ("build/bench-quick" if args.quick else "docs/perf"))
    if args.render is not None:
        rendered = json.loads(args.render.read_text())
        _extras(args, rendered, FULL if rendered.get("mode") == "full" else QUICK)
        for path in report.render(rendered, out):
            print(path)
        return 0
    backends = tuple(b for b in args.backends.split(",") if b)
    unknown = set(backends) - set(ALL_BACKENDS)
    if unknown:
        sys.exit(f"unknown backends: {', '.join(sorted(unknown))}")
    only = frozenset(args.only)
    if only - {w.key[0] for w in WORKLOADS}:
        sys.exit(f"--only takes workload letters among {''.join(w.key[0] for w in WORKLOADS)}")

    started = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    load_start = _load()
    start = time.monotonic()
    # Server logs and profiles stay out of docs/: build/ is not committed.
    scratch = ROOT / "build" / "bench" / f"{started:%Y%m%dT%H%M%SZ}-{mode}"
    run = Run(
        sizes=sizes,
        launcher=Launcher(keel_root=args.keel_root.resolve(), log_dir=scratch / "logs"),
        backends=backends,
        py_spy=args.py_spy,
        profile_dir=scratch / "profiles",
        log=lambda line: print(f"[bench {time.monotonic() - start:6.1f}s] {line}", flush=True),
    )
    run.run(only)
    results: dict[str, Any] = {
        "schema": 2,
        "mode": mode,
        "started_at": started.isoformat().replace("+00:00", "Z"),
        "duration_s": time.monotonic() - start,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": {"start": load_start, "end": _load()},
            "python": platform.python_version(),
            "grpcio": metadata.version("grpcio"),
            "protobuf": metadata.version("protobuf"),
            "redis_py": metadata.version("redis"),
            "redis_server": run.redis_version,
            **({"postgres": run.postgres_version} if run.postgres_version else {}),
            "keel_root": str(args.keel_root.resolve()),
            "keel_commit": _keel_version(args.keel_root.resolve()),
        },
        "sizes": {name: getattr(sizes, name) for name in sizes.__dataclass_fields__},
        "stores": run.described,
        "ceilings": run.ceilings,
        "workloads": run.workloads,
    }
    _extras(args, results, sizes)
    for path in report.write(results, out):
        print(path)
    print(f"server logs{' and profiles' if args.py_spy else ''}: {scratch}")
    failed = [
        f"{key}/{backend}"
        for key, per_backend in run.workloads.items()
        for backend, result in per_backend.items()
        if not result.get("ok") and not result.get("skipped")
    ]
    if failed:
        print(f"workloads that failed their checks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
