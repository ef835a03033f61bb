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
    "c_fanout",
    "d_replay",
    "e_rejoin",
    "f_overhead",
    "g_tasks",
)
CEILINGS = ("grpc_one_stream", "grpc_many_streams", "grpc_fanout", "grpc_batched", "redis")
BACKENDS = ("memory", "redis")
ON_TEMPORAL = ("a_stream", "b_concurrent", "f_overhead")  # also measured on the Temporal executor
QUICK_TIMEOUT_S = 100  # under pytest's 120 s; a quick run takes about 20 s


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
        backends = (*BACKENDS, "temporal") if key in ON_TEMPORAL else BACKENDS
        assert set(results["workloads"][key]) == set(backends)
        for backend in backends:
            result = results["workloads"][key][backend]
            assert result["ok"] is True, (key, backend, result.get("errors"))
            assert _number(result["server_peak_rss_kib"]) and result["server_peak_rss_kib"] > 0
    assert set(results["ceilings"]) == set(CEILINGS)
    for key in CEILINGS:
        assert "errors" not in results["ceilings"][key], results["ceilings"][key]


def test_every_figure_has_a_value_and_every_ratio_its_ceiling(quick_run: Path) -> None:
    figures = _results(quick_run)["figures"]
    assert {row["workload"] for row in figures} == set(WORKLOADS)
    for row in figures:
        assert row["better"] in ("higher", "lower")
        for cell in row["backends"].values():
            assert _number(cell["value"]), row
            if row["ceiling_name"]:
                assert _number(cell["ceiling"]), row
                assert cell["ratio"] is None or _number(cell["ratio"]), row


def test_the_four_targets_are_judged_on_both_backends(quick_run: Path) -> None:
    targets = _results(quick_run)["targets"]
    assert len(targets) == 4
    for row in targets:
        temporal = {"temporal"} if row["workload"] in ON_TEMPORAL else set()
        assert set(row["backends"]) == set(BACKENDS) | temporal
        for cell in row["backends"].values():
            assert _number(cell["value"])
            assert isinstance(cell["met"], bool)


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
