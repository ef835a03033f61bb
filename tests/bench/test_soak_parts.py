"""Parts of the soak (bench/soak.py) on their own: its scripts, its index checks, its slope,
its report. The soak itself runs for minutes and is not part of CI (scripts/soak)."""

from __future__ import annotations

import dataclasses
import json

from bench import soak
from server.agents.testing import parse_script


def test_every_kind_of_soak_script_is_valid_for_the_scripted_agent() -> None:
    kinds = {}
    for number in range(140):  # every combination of the 4th, 7th and 10th runs' extras
        text, approvals, records, denies = soak.script_for(number)
        steps = parse_script(text).steps
        assert records == 2
        kinds[(approvals, denies, "fail" in text)] = len(steps)
    assert set(kinds) == {(a, d, f) for a in (1, 2) for d in (False, True) for f in (False, True)}


def test_indices_count_gaps_and_duplicates() -> None:
    indices = soak.Indices(5)
    assert [indices.take(i) for i in (5, 6, 6, 9, 10, 3)] == [True, True, False, False, True, False]
    assert (indices.next, indices.gaps, indices.duplicates) == (11, 1, 2)


def test_slope_is_per_minute() -> None:
    assert soak.slope_per_minute([(0, 100.0), (60, 101.0), (120, 102.0)]) == 1.0
    assert soak.slope_per_minute([(0, 5.0)]) is None


def test_the_report_renders_from_its_json() -> None:
    samples = [
        {
            "t_s": float(t),
            "rss_mib": 100.0 + t / 600,
            "fds": 40,
            "asyncio_tasks": 300.0,
            "server_cpu_s": t / 2,
            "runs_active": 30.0,
            "streams_open": 60.0,
            "events_appended": 1000.0 * t,
            "redis_dbsize": 3000,
            "redis_keys_scanned": 2900,
            "redis_used_mib": 15.0,
            "run_index": 20 * t,
            "active_set": 40,
            "lease_deadlines": 40,
            "runs_started": 20 * t,
            "runs_ended": 20 * t,
            "expiry_checked": 0,
            "expiry_left": 0,
        }
        for t in range(0, 130, 10)
    ]
    counts = soak.Counts(runs_started=10, runs_succeeded=10)
    result = {
        "started_at": "2026-12-01T00:00:00Z",
        "duration_s": 130.0,
        "config": {
            "minutes": 2.0,
            "runs": 50,
            "observers": 20,
            "ttl_s": 60.0,
            "margin_s": 10.0,
            "sample_s": 10.0,
            "seed": 1,
        },
        "machine": {
            "cpus": 2,
            "load_average": {"start": "1", "end": "2"},
            "keel_commit": "abc",
        },
        "counts": json.loads(json.dumps(dataclasses.asdict(counts))),
        "failures": soak.failures(counts),
        "summary": soak.summary(samples),
        "samples": samples,
        "server_warnings": {"count": 0, "examples": []},
    }
    text = soak.markdown(result)
    assert "**PASSED**" in text
    assert "| server RSS | +0.100 MiB/min |" in text
    assert "The run index" in text  # it grew 120 a minute in these samples
    counts.observer_gaps = 1
    assert soak.failures(counts) == ["gaps seen by observers: 1"]
