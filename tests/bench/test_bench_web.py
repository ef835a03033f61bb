"""The HTTP port's benchmark still runs: `python -m bench.web --quick` end to end.

No timing is asserted. What is asserted: every transport was measured in
every round, every stream passed its own checks (every event once, in
order, to the terminal one), each figure is a positive number, and the
Markdown table names every transport.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
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
QUICK_TIMEOUT_S = 60  # a quick run takes under 20 s


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def test_quick_run_measures_every_transport_against_grpc(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.web", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    results = json.loads((tmp_path / "web.json").read_text())
    assert results["mode"] == "quick"
    assert results["ok"] is True
    rounds = results["sizes"]["rounds"]
    for section, names in (("replay", REPLAYED), ("live", LIVE)):
        assert set(results[section]) == set(names), section
        for name in names:
            row = results[section][name]
            assert row["ok"] is True, (section, name)
            assert len(row["rounds"]) == rounds
            for figure in ("events_per_s", "server_cpu_us_per_event", "client_cpu_us_per_event"):
                assert _positive(row[figure]), (section, name, figure, row[figure])
                assert _positive(row[f"{figure}_ratio"]), (section, name, figure)
            for measured in row["rounds"]:
                assert measured["ok"] is True
                assert measured["events"] == measured["streams"] * row["events_per_stream"]
        assert results[section]["grpc"]["events_per_s_ratio"] == 1.0
    # A replay reads the whole ended run: its deltas and the 8 events around them.
    events = results["sizes"]["deltas"] + 8
    assert results["run"]["events"] == events
    assert all(results["replay"][name]["events_per_stream"] == events for name in REPLAYED)
    for key in ("binary_bytes_per_event", "json_bytes_per_event", "sse_data_bytes_per_event"):
        assert _positive(results["payload"][key]), key
    markdown = (tmp_path / "web.md").read_text()
    for section in ("replay", "live"):
        for row in results[section].values():
            assert f"| {row['label']} |" in markdown
