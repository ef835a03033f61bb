"""The benchmark still runs: `python -m bench --quick` end to end, and its report is well formed.

No timing is asserted: the benchmark reports numbers, tests stay
deterministic. What is asserted: every workload and ceiling ran, every
stream passed its own checks (every event once, in order, to the terminal
one), and the JSON, Markdown and PNG outputs hold what docs/perf/README.md
says they hold.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = (
    "a_stream",
    "b_concurrent",
    "b_concurrent_w1",
    "b_concurrent_w2",
    "c_fanout",
    "d_replay",
    "e_rejoin",
    "f_overhead",
    "g_tasks",
    "h_live_runs",
    "h_live_runs_w1",
    "h_live_runs_w2",
    "i_short_runs",
)
CEILINGS = ("grpc_one_stream", "grpc_many_streams", "grpc_fanout", "grpc_batched", "redis")
BACKENDS = ("memory", "redis")
ON_TEMPORAL = ("a_stream", "b_concurrent", "f_overhead")  # also measured on the Temporal executor
# The workers comparisons of b and h
ON_REDIS_ONLY = ("b_concurrent_w1", "b_concurrent_w2", "h_live_runs_w1", "h_live_runs_w2")
# Skipped (not failed) when the measured server has no `serve --workers`.
MAY_SKIP = ("b_concurrent_w2", "h_live_runs_w2")
H_VARIANTS = ("h_live_runs", "h_live_runs_w1", "h_live_runs_w2")
QUICK_TIMEOUT_S = 100  # under pytest's 120 s; a quick run takes about 30 s


def _backends(key: str) -> tuple[str, ...]:
    if key in ON_REDIS_ONLY:
        return ("redis",)
    return (*BACKENDS, "temporal") if key in ON_TEMPORAL else BACKENDS


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    return out


def _results(out: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return results


def test_quick_run_measures_every_workload_on_both_backends_and_every_ceiling(
    quick_run: Path,
) -> None:
    results = _results(quick_run)
    assert results["mode"] == "quick"
    assert set(results["workloads"]) == set(WORKLOADS)
    for key in WORKLOADS:
        backends = _backends(key)
        assert set(results["workloads"][key]) == set(backends)
        for backend in backends:
            result = results["workloads"][key][backend]
            if key in MAY_SKIP and result.get("skipped"):
                assert "--workers" in result["skipped"]
                continue
            assert result["ok"] is True, (key, backend, result.get("errors"))
            assert _number(result["server_peak_rss_kib"]) and result["server_peak_rss_kib"] > 0
    assert set(results["ceilings"]) == set(CEILINGS)
    for key in CEILINGS:
        assert "errors" not in results["ceilings"][key], results["ceilings"][key]


def _skipped(results: dict[str, Any], key: str, backend: str) -> bool:
    return bool(results["workloads"][key][backend].get("skipped"))


def test_every_figure_has_a_value_and_every_ratio_its_ceiling(quick_run: Path) -> None:
    results = _results(quick_run)
    figures = results["figures"]
    assert {row["workload"] for row in figures} == set(WORKLOADS)
    for row in figures:
        assert row["better"] in ("higher", "lower")
        for backend, cell in row["backends"].items():
            if _skipped(results, row["workload"], backend):
                assert cell["value"] is None
                continue
            assert _number(cell["value"]), row
            if row["ceiling_name"]:
                assert _number(cell["ceiling"]), row
                assert cell["ratio"] is None or _number(cell["ratio"]), row


def test_the_targets_are_judged_where_they_apply(quick_run: Path) -> None:
    targets = _results(quick_run)["targets"]
    # The four first ones on every backend; the CPU, live-run and short-run ones on
    # Redis; no Mastra target without --mastra.
    assert len(targets) == 10
    for row in targets[:4]:
        temporal = {"temporal"} if row["workload"] in ON_TEMPORAL else set()
        assert set(row["backends"]) == set(BACKENDS) | temporal
    for row in targets[4:]:
        assert set(row["backends"]) == {"redis"}, row["target"]
    for row in targets:
        for cell in row["backends"].values():
            assert _number(cell["value"])
            assert isinstance(cell["met"], bool)
    # h's are judged on its best way on Redis, the same for all three, and say which.
    live = [row for row in targets if row["workload"] == "h_live_runs"]
    assert len(live) == 3
    ways = {row["backends"]["redis"]["keel"] for row in live}
    assert len(ways) == 1 and ways <= set(H_VARIANTS)
    markdown = (quick_run / "latest.md").read_text()
    assert f"({ways.pop()}) |" in markdown


def test_cpu_is_measured_per_event_and_per_run(quick_run: Path) -> None:
    results = _results(quick_run)
    for key in ("a_stream", "b_concurrent", "f_overhead"):
        for backend in _backends(key):
            result = results["workloads"][key][backend]
            # Clock ticks are 10 ms: a tiny quick run may see none, never fewer.
            assert _number(result["server_cpu_us_per_event"]) and result["server_cpu_s"] >= 0
            assert _number(result["client_cpu_us_per_event"])
            assert ("redis_cpu_s" in result) == (backend != "memory")
    for backend in BACKENDS:
        overhead = results["workloads"]["f_overhead"][backend]
        assert _number(overhead["in_process_cpu_us_per_event"])
        assert overhead["in_process_cpu_us_per_event"] > 0
        for key in ("h_live_runs", "i_short_runs"):
            result = results["workloads"][key][backend]
            assert _number(result["server_cpu_ms_per_run"]), key
            assert result["server_cpu_s_whole_client"] > 0, key
    live = results["workloads"]["h_live_runs"]["redis"]
    assert live["runs"] == results["sizes"]["live_runs"]
    assert live["delivery_samples"] == live["events"]
    for name in ("delivery_p50_ms", "delivery_p99_ms", "wall_over_scripted", "client_cpu_s"):
        assert _number(live[name]), name
    assert "delays_ms" not in live and all("delays_ms" not in c for c in live["clients"])
    rows = {(row["workload"], row["process"]) for row in results["cpu"]}
    assert {("a_stream", "server"), ("f_overhead", "in-process"), ("h_live_runs", "server")} <= rows
    markdown = (quick_run / "latest.md").read_text()
    assert "## CPU per event" in markdown
    assert "## Workers: workload b on Redis" in markdown


@pytest.mark.parametrize(
    ("key", "table", "channels"),
    [
        ("b_concurrent", "workers", "compare_channels"),
        ("h_live_runs", "live_workers", "live_compare_channels"),
    ],
)
def test_the_workers_comparison_runs_or_says_why_not(
    quick_run: Path, key: str, table: str, channels: str
) -> None:
    results = _results(quick_run)
    one = results["workloads"][f"{key}_w1"]["redis"]
    many = results["workloads"][f"{key}_w2"]["redis"]
    workers = results[table]
    if many.get("skipped"):
        assert workers["skipped"] == many["skipped"]
        return
    assert many["server_workers"] == results["sizes"]["compare_workers"]
    assert many["server_processes"] == 1 + many["server_workers"]  # the parent and its workers
    # The same client against both: the same connections.
    assert workers["connections"] == results["sizes"][channels]
    for result in (one, many):
        assert result.get("connections", result.get("channels")) == results["sizes"][channels]
    by_process = many["server_peak_rss_kib_by_process"]
    assert len(by_process) == many["server_processes"] and all(k > 0 for k in by_process)
    assert many["server_peak_rss_kib"] == sum(by_process)
    assert many["server_peak_rss_max_kib"] == max(by_process)
    assert all(_number(row["one"]) and _number(row["many"]) for row in workers["rows"])
    heading = f"## Workers: workload {key[0]} on Redis, one server process against --workers"
    assert heading in (quick_run / "latest.md").read_text()


def test_the_temporal_executor_is_compared_with_the_local_one(quick_run: Path) -> None:
    rows = _results(quick_run)["executors"]
    assert {row["workload"] for row in rows} == set(ON_TEMPORAL)
    for row in rows:
        assert _number(row["local"]) and _number(row["temporal"]) and _number(row["ratio"])
    assert "Temporal executor against the local one" in (quick_run / "latest.md").read_text()


def test_each_run_is_kept_as_json_and_the_latest_as_markdown_and_png(quick_run: Path) -> None:
    runs = list((quick_run / "runs").glob("*-quick.json"))
    assert len(runs) == 1
    assert json.loads(runs[0].read_text()) == _results(quick_run)
    markdown = (quick_run / "latest.md").read_text()
    for heading in ("## Targets", "## Keel against its ceilings", "## Ceilings of this run"):
        assert heading in markdown
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: no chart")
    assert (quick_run / "latest.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "![" in markdown and "(latest.png)" in markdown


def test_a_runs_json_renders_again(quick_run: Path, tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--render",
            str(quick_run / "latest.json"),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    assert (tmp_path / "latest.md").read_text() == (quick_run / "latest.md").read_text()


def _mastra_results(directory: Path) -> None:
    """Two files as the Mastra harness writes them (bench.mjs --json), numbers made up."""
    single = {
        "meta": {"node": "v22", "mastraCore": "1.71.0", "cache": "redis", "tool": False},
        "scenarios": {
            "single": {
                "10000": {
                    "reps": [
                        {"ms": 500.0, "chunks": 10007, "cpuMs": 400.0, "othersCpuPct": 3},
                        {"ms": 1000.0, "chunks": 10007, "cpuMs": 500.0, "othersCpuPct": 5},
                    ]
                }
            }
        },
    }
    concurrent = {
        "meta": {"node": "v22", "cache": "redis", "tool": False},
        "scenarios": {
            "concurrent": {
                "n": 1000,
                "concurrency": 100,
                "reps": [
                    {"wallMs": 5000.0, "chunksPerS": 20000.0, "cpuMs": 5000.0, "chunks": 100700}
                ],
            }
        },
    }
    plain = {"meta": {"plain": True, "cache": "redis"}, "scenarios": {"concurrent": {}}}
    for name, doc in (("single", single), ("conc", concurrent), ("plain", plain)):
        (directory / f"{name}.json").write_text(json.dumps(doc))


def test_a_baseline_and_mastra_show_next_to_every_figure(quick_run: Path, tmp_path: Path) -> None:
    peers = tmp_path / "mastra"
    peers.mkdir()
    _mastra_results(peers)
    out = tmp_path / "out"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--render",
            str(quick_run / "latest.json"),
            "--baseline",
            str(quick_run / "latest.json"),
            "--mastra",
            str(peers),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    markdown = (out / "latest.md").read_text()
    assert "| memory before | memory | redis before | redis |" in markdown
    assert "## Keel against Mastra" in markdown
    assert "Mastra's (redis cache)" in markdown  # the target row
    results = _results(quick_run)
    # The run against itself: every "before" is the value now.
    b = next(row for row in results["figures"] if row["figure"] == "aggregate events/s")
    value = b["backends"]["redis"]["value"]
    assert f"| {value:,.0f} events/s | {value:,.0f} events/s |" in markdown
