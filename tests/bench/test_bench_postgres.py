"""The benchmark's PostgreSQL backend: Keel on a PostgreSQL of the benchmark's own (workloads
a, b and d), held against the raw PostgreSQL ceiling measured in the same run.

The quick run is small (`--quick --backends postgres --only abd`: about 10 s); no timing is
asserted, only that everything ran, passed its checks and has its ratio.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import analysis, report
from bench.procs import PG_BIN, POSTGRES, POSTGRES_SYNC_SETTINGS, PostgresServer
from bench.runner import ALL_BACKENDS, BACKENDS, WORKLOADS, runs_on, store_ceiling, store_of

ROOT = Path(__file__).resolve().parents[2]
ON_POSTGRES = ("a_stream", "b_concurrent", "d_replay")
INSERTS = (
    "insert_one",
    "insert_pipelined_100",
    "insert_batch_10",
    "insert_batch_100",
    "insert_batch_1000",
)
needs_postgres = pytest.mark.skipif(
    not (PG_BIN / "initdb").exists(), reason=f"no PostgreSQL server binaries in {PG_BIN}"
)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_postgres_runs_a_b_and_d_on_a_store_of_its_own_never_by_default() -> None:
    for backend in (POSTGRES, "postgres-sync"):
        assert backend in ALL_BACKENDS and backend not in BACKENDS
        assert {w.key for w in WORKLOADS if runs_on(w, backend)} == set(ON_POSTGRES)
        assert store_of(backend) == backend
    assert store_ceiling(POSTGRES) == POSTGRES
    assert store_ceiling("postgres-sync") == "postgres@postgres-sync"
    assert POSTGRES_SYNC_SETTINGS["synchronous_commit"] == "on"


def test_postgres_is_held_against_the_raw_postgres_ceiling() -> None:
    ceilings = {
        "grpc_one_stream": {"messages_per_s": 20_000.0, "time_to_first_ms": 1.0},
        "redis": {"lua_append_one": {"events_per_s": 10_000.0}},
        POSTGRES: {
            "insert_one": {"events_per_s": 4_000.0},
            "select_array_pages_1000": {"events": 10_000, "ms": 5.0},
        },
        "postgres@postgres-sync": {"insert_one": {"events_per_s": 500.0}},
    }
    workloads = {
        "a_stream": {
            "redis": {"ok": True, "events_per_s": 12_000.0},
            POSTGRES: {"ok": True, "events_per_s": 8_000.0, "postgres_cpu_us_per_event": 9.0},
            "postgres-sync": {"ok": True, "events_per_s": 1_000.0},
        },
        "d_replay": {POSTGRES: {"ok": True, "time_to_last_event_ms": 20.0}},
    }
    rows = {row["figure"]: row for row in analysis.figures(ceilings, workloads)}
    vs_pg = rows["events/s at the client (vs PostgreSQL)"]["backends"]
    assert set(vs_pg) == {POSTGRES, "postgres-sync"}
    assert vs_pg[POSTGRES]["ratio"] == 2.0
    assert vs_pg["postgres-sync"]["ceiling"] == 500.0  # its own store's raw ceiling
    assert set(rows["events/s at the client (vs Redis)"]["backends"]) == {"redis"}
    assert rows["events/s at the client"]["backends"][POSTGRES]["ratio"] == 0.4
    replay = rows["time to the last event (vs PostgreSQL)"]["backends"][POSTGRES]
    assert replay["ceiling"] == 5.0 and replay["ratio"] == 4.0
    cpu = analysis.cpu(workloads)
    assert any(r["process"] == "postgres" and r["backends"][POSTGRES] == 9.0 for r in cpu)


@needs_postgres
def test_a_postgres_store_flushes_its_schemas() -> None:
    server = PostgresServer.start()
    try:
        assert server.version().startswith("15")
        assert server.pids and all(pid > 0 for pid in server.pids)
        server._psql("CREATE SCHEMA bench_x; CREATE TABLE bench_x.t (a int)")
        server.flush()
        assert server._psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'bench_x'") == "0"
        assert server.describe()["settings"]["fsync"] == "off"
    finally:
        server.stop()
    assert not server.root.exists()


@needs_postgres
def test_quick_run_on_postgres_measures_a_b_d_and_the_raw_ceiling(tmp_path: Path) -> None:
    argv = ["-m", "bench", "--quick", "--backends", POSTGRES, "--only", "abd"]
    done = subprocess.run(
        [sys.executable, *argv, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["machine"]["postgres"].startswith("15")
    assert results["stores"][POSTGRES]["kind"] == "postgresql"
    ceiling = results["ceilings"][POSTGRES]
    assert "errors" not in ceiling, ceiling
    for name in INSERTS:
        assert _number(ceiling[name]["events_per_s"]) and ceiling[name]["events_per_s"] > 0
    for name in ("select_all", "select_pages_1000", "select_array_all", "select_array_pages_1000"):
        assert _number(ceiling[name]["ms"]) and ceiling[name]["events"] > 0
    for key in ON_POSTGRES:
        result = results["workloads"][key][POSTGRES]
        assert result["ok"] is True, (key, result.get("errors"))
    assert _number(results["workloads"]["b_concurrent"][POSTGRES]["postgres_cpu_us_per_event"])
    rows = {(r["workload"], r["figure"]): r for r in results["figures"]}
    for key in (
        ("a_stream", "events/s at the client (vs PostgreSQL)"),
        ("d_replay", "time to the last event (vs PostgreSQL)"),
        ("a_stream", "events/s at the client"),
        ("b_concurrent", "aggregate events/s"),
    ):
        cell = rows[key]["backends"][POSTGRES]
        assert _number(cell["value"]) and _number(cell["ceiling"]) and _number(cell["ratio"])
    markdown = (tmp_path / "latest.md").read_text()
    assert "| postgres ratio |" in markdown
    assert "| postgres insert_one |" in markdown
    assert "PostgreSQL 15" in report.markdown(results, None)
