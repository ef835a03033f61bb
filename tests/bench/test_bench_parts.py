"""Parts of the benchmark on their own: /proc CPU of process trees, merging client
processes, reading Mastra's results, a baseline's "before". Nothing is timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import analysis, cpu, mastra
from bench.runner import merge_live_runs


def test_a_process_tree_holds_its_children_and_their_cpu() -> None:
    # A child that burns a known amount of CPU (by its own clock) and waits to be read.
    code = (
        "import sys, time\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "print('done', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "done"
        assert child.pid in cpu.descendants(os.getpid())
        assert cpu.tree([os.getpid()])[0] == os.getpid()
        # Ticks of 10 ms: at least 0.3 s less one tick, and the tree holds it.
        assert cpu.process_cpu_s(child.pid) >= 0.29
        assert cpu.tree_cpu_s([os.getpid()]) >= cpu.process_cpu_s(child.pid)
        assert cpu.per_process_cpu_s([os.getpid()])[child.pid] == cpu.process_cpu_s(child.pid)
        assert cpu.start_ticks(child.pid) == cpu.start_ticks(child.pid) is not None
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=30)
    finally:
        child.kill()
        child.wait()
    assert cpu.process_cpu_s(child.pid) == 0.0  # gone
    assert cpu.start_ticks(child.pid) is None


def test_a_meter_adds_up_its_windows() -> None:
    meter = cpu.Meter()  # this process
    for _ in range(2):
        meter.start()
        sum(range(100_000))
        assert meter.stop() >= 0.0
    assert meter.total_s >= 0.0
    assert meter.stop() == 0.0  # no window open


def _client(start_ns: int, end_ns: int, delays: list[float], cpu_s: float) -> dict[str, object]:
    return {
        "ok": True,
        "runs": 2,
        "events": len(delays),
        "start_wall_ns": start_ns,
        "end_wall_ns": end_ns,
        "client_cpu_s": cpu_s,
        "client_wall_s": (end_ns - start_ns) / 1e9,
        "admitted_max_s": 1.0,
        "delays_ms": delays,
        "failed": 0,
        "errors": [],
    }


def test_live_runs_merge_over_client_processes() -> None:
    merged = merge_live_runs(
        [
            _client(1_000_000_000, 6_000_000_000, [1.0, 2.0, 3.0], 0.5),
            _client(1_100_000_000, 6_500_000_000, [4.0, 100.0], 2.7),
        ],
        {"deltas": 10, "delay_ms": 500},
    )
    assert merged["runs"] == 4 and merged["events"] == 5
    assert merged["runs_wall_s"] == 5.5  # first go to last end
    assert merged["admitted_max_s"] == 1.1  # the second went 0.1 s after the first
    assert merged["scripted_s"] == 4.5  # 9 pauses of 500 ms
    assert merged["wall_over_scripted"] == 5.5 / 4.5
    assert merged["delivery_p50_ms"] == 3.0 and merged["delivery_max_ms"] == 100.0
    assert merged["client_cpu_s"] == 3.2
    assert merged["connections"] == 2  # one each (a client without "channels" had one)
    assert merged["client_cpu_share_max"] == 2.7 / 5.4
    assert all("delays_ms" not in client for client in merged["clients"])


def test_mastra_results_are_read_by_cache_closest_to_keels_sizes(tmp_path: Path) -> None:
    def doc(cache: str, scenarios: dict[str, object], **meta: object) -> str:
        return json.dumps({"meta": {"cache": cache, "node": "v22", **meta}, "scenarios": scenarios})

    single = {
        "1000": {"reps": [{"ms": 100.0, "chunks": 1007, "cpuMs": 50.0}]},
        "10000": {
            "reps": [
                {"ms": 1000.0, "chunks": 10007, "cpuMs": 400.0},
                {"ms": 500.0, "chunks": 10007, "cpuMs": 600.0},
                {"ms": 800.0, "chunks": 10007, "cpuMs": 500.0},
            ]
        },
    }
    (tmp_path / "a.json").write_text(doc("memory", {"single": single}))
    for c, rate in ((50, 1.0), (100, 9000.0)):
        concurrent = {
            "n": 1000,
            "concurrency": c,
            "reps": [{"chunksPerS": rate, "cpuMs": 1007.0, "chunks": 100_700, "wallMs": 1.0}],
        }
        (tmp_path / f"c{c}.json").write_text(doc("redis", {"concurrent": concurrent}))
    (tmp_path / "tool.json").write_text(doc("memory", {"single": {"10000": {}}}, tool=True))
    (tmp_path / "notes.txt").write_text("not JSON")

    found = mastra.load(tmp_path)
    one = found["single"]["memory"]
    assert one["deltas"] == 10_000 and one["reps"] == 3
    assert one["events_per_s"] == 10007 / 0.8
    assert one["cpu_us_per_event"] == 500_000 / 10007
    many = found["concurrent"]["redis"]
    assert (many["runs"], many["deltas"], many["events_per_s"]) == (100, 1000, 9000.0)
    assert many["cpu_us_per_event"] == 10.0
    assert "tool.json" not in found["files"]
    assert analysis.mastra_pick(found, "concurrent") == ("redis", many)


def _workloads(b_redis: float, w2: float | None) -> dict[str, dict[str, dict[str, object]]]:
    b: dict[str, object] = {"ok": True, "events_per_s": b_redis, "server_cpu_us_per_event": 50.0}
    workloads: dict[str, dict[str, dict[str, object]]] = {
        "b_concurrent": {"redis": b, "memory": {**b, "events_per_s": 1.0}},
        "b_concurrent_w1": {"redis": {**b, "events_per_s": 900.0}},
    }
    many: dict[str, object] = {"ok": False, "skipped": "skipped: no --workers"}
    if w2 is not None:
        many = {"ok": True, "events_per_s": w2, "server_cpu_us_per_event": 40.0}
    workloads["b_concurrent_w2"] = {"redis": many}
    return workloads


def test_the_mastra_target_takes_keels_best_b_on_redis() -> None:
    peer = {"concurrent": {"memory": {"events_per_s": 10.0}, "redis": {"events_per_s": 600.0}}}
    row = analysis.mastra_target(_workloads(800.0, 1200.0), peer)
    assert row is not None
    cell = row["backends"]["redis"]
    assert cell["keel"] == "b_concurrent_w2" and cell["value"] == 2.0 and cell["met"]
    row = analysis.mastra_target(_workloads(800.0, None), peer)  # --workers skipped
    assert row is not None
    cell = row["backends"]["redis"]
    assert cell["keel"] == "b_concurrent_w1" and cell["value"] == 1.5 and cell["met"]
    assert analysis.mastra_target(_workloads(800.0, None), {}) is None


def test_workers_compare_one_process_with_workers_or_say_why_not() -> None:
    table = analysis.workers(_workloads(800.0, 1200.0))
    assert table is not None
    events = table["rows"][0]
    assert (events["one"], events["many"], events["ratio"]) == (900.0, 1200.0, 1200.0 / 900.0)
    skipped = analysis.workers(_workloads(800.0, None))
    assert skipped is not None and skipped["skipped"] == "skipped: no --workers"
    assert skipped["rows"][0]["many"] is None and skipped["rows"][0]["ratio"] is None


def _live(wall: float, p99: float, rss_mb: float, ok: bool = True) -> dict[str, object]:
    kib = rss_mb * 1e6 / 1024
    return {
        "ok": ok,
        "wall_over_scripted": wall,
        "delivery_p50_ms": p99 / 2,
        "delivery_p99_ms": p99,
        "server_cpu_ms_per_run": 5.0,
        "server_peak_rss_kib": kib,
        "server_peak_rss_max_kib": kib / 2,
        "connections": 16,
    }


def _live_targets(**ways: dict[str, object]) -> list[dict[str, Any]]:
    workloads = {key: {"redis": result} for key, result in ways.items()}
    workloads["h_live_runs"]["memory"] = _live(1.0, 1.0, 1.0)  # never judged
    rows = analysis.targets({}, workloads)
    return [row for row in rows if row["workload"] == "h_live_runs"]


def test_the_live_run_targets_judge_the_best_way_on_redis() -> None:
    # w2 meets all three; w1 meets two; one connection meets one.
    rows = _live_targets(
        h_live_runs=_live(3.0, 500.0, 300.0),
        h_live_runs_w1=_live(1.1, 500.0, 300.0),
        h_live_runs_w2=_live(1.1, 80.0, 390.0),
    )
    assert [set(row["backends"]) for row in rows] == [{"redis"}] * 3
    cells = [row["backends"]["redis"] for row in rows]
    assert [c["keel"] for c in cells] == ["h_live_runs_w2"] * 3
    assert [c["value"] for c in cells] == [1.1, 80.0, 390.0]
    assert all(c["met"] for c in cells)
    # None meets all: the most met, then the closest worst one (w1's p99: 1.5x, w2's: 3x).
    rows = _live_targets(
        h_live_runs=_live(3.0, 500.0, 300.0),
        h_live_runs_w1=_live(1.1, 150.0, 300.0),
        h_live_runs_w2=_live(1.1, 300.0, 390.0),
    )
    assert {row["backends"]["redis"]["keel"] for row in rows} == {"h_live_runs_w1"}
    # A way that failed its checks is never the best; --workers skipped: the others.
    rows = _live_targets(
        h_live_runs=_live(1.5, 500.0, 300.0),
        h_live_runs_w1=_live(1.0, 1.0, 1.0, ok=False),
        h_live_runs_w2={"ok": False, "skipped": "skipped: no --workers"},
    )
    assert {row["backends"]["redis"]["keel"] for row in rows} == {"h_live_runs"}
    # An old run with h alone: judged on it.
    rows = _live_targets(h_live_runs=_live(1.5, 50.0, 300.0))
    assert [row["backends"]["redis"]["met"] for row in rows] == [False, True, True]


def test_live_workers_compare_one_process_with_workers() -> None:
    workloads = {
        "h_live_runs_w1": {"redis": _live(2.0, 400.0, 200.0)},
        "h_live_runs_w2": {"redis": {**_live(1.5, 100.0, 300.0), "server_workers": 2}},
    }
    table = analysis.live_workers(workloads)
    assert table is not None
    assert (table["workers"], table["connections"]) == (2, 16)
    rows = {row["name"]: row for row in table["rows"]}
    wall = rows["time until every run ended / the script's duration"]
    assert (wall["one"], wall["many"], wall["ratio"]) == (2.0, 1.5, 0.75)
    assert rows["server peak RSS, all its processes (MB)"]["many"] == 300.0
    assert rows["server peak RSS, its largest process (MB)"]["many"] == 150.0
    assert analysis.live_workers({}) is None


def test_a_baseline_without_the_new_figures_leaves_them_empty() -> None:
    old = {
        "started_at": "2026-01-01T00:00:00Z",
        "mode": "full",
        "machine": {"keel_commit": "abc"},
        "ceilings": {"grpc_many_streams": {"messages_per_s": 1000.0}},
        "workloads": {"b_concurrent": {"redis": {"ok": True, "events_per_s": 500.0}}},
    }
    then = analysis.before(old, "old.json", None)
    assert then["keel_commit"] == "abc"
    by_name = {row["figure"]: row for row in then["figures"]}
    assert by_name["aggregate events/s"]["backends"]["redis"]["ratio"] == 0.5
    assert by_name["server CPU per event"]["backends"]["redis"]["value"] is None
