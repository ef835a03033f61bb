"""Read a results directory of the Mastra peer harness (Mastra's durable-agent benchmark,
a Node project: `--mastra` points at its results directory).

docs/perf/README.md describes the files. Each of the harness's processes
writes one JSON file: `meta` (node, mastraCore, cache "memory" or "redis",
plain, tool, delayMs) and `scenarios`. Two of its scenarios mirror Keel's
workloads:

- `single` (per n): one durable run of n text deltas end to end, repeated:
  per rep `ms`, `chunks` (what the fullStream consumer received: n + 7),
  `cpuMs` (the process's user + system CPU over the rep; the agent, its
  durable event log and the consumer all run in that one process);
- `concurrent`: `concurrency` runs of n deltas at once (Promise.all): per rep
  `chunksPerS` (aggregate), `cpuMs`, `chunks`.

Like Keel's (a) and (b): one run of 10,000 deltas, 100 runs of 1,000. Only
durable runs without a tool step or pacing count. Every rep of every file
is pooled and the median taken, as its own summarize.mjs does. Its CPU
excludes its Redis, as Keel's server CPU excludes Keel's.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

Params = dict[str, Any]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def load(
    directory: Path, single_deltas: int = 10_000, runs: int = 100, deltas: int = 1_000
) -> Params:
    """Mastra's single and concurrent figures by cache, closest to Keel's sizes."""
    single: dict[tuple[str, int], list[Params]] = {}
    concurrent: dict[tuple[str, int, int], list[Params]] = {}
    meta: Params = {}
    files = []
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or "scenarios" not in doc:
            continue
        info = doc.get("meta") or {}
        if info.get("plain") or info.get("tool") or info.get("delayMs"):
            continue
        files.append(path.name)
        meta = meta or info
        cache = str(info.get("cache", "memory"))
        for n, row in (doc["scenarios"].get("single") or {}).items():
            single.setdefault((cache, int(n)), []).extend(row.get("reps", []))
        row = doc["scenarios"].get("concurrent")
        if row:
            key = (cache, int(row["concurrency"]), int(row["n"]))
            concurrent.setdefault(key, []).extend(row.get("reps", []))
    result: Params = {
        "source": str(directory),
        "files": files,
        "node": meta.get("node"),
        "mastra_core": meta.get("mastraCore"),
        "single": {},
        "concurrent": {},
    }
    for cache in ("memory", "redis"):
        sizes = [n for c, n in single if c == cache]
        if sizes:
            n = min(sizes, key=lambda n: abs(n - single_deltas))
            reps = single[(cache, n)]
            result["single"][cache] = {
                "deltas": n,
                "reps": len(reps),
                "events_per_s": _median([r["chunks"] / (r["ms"] / 1000) for r in reps]),
                "cpu_us_per_event": _median([r["cpuMs"] * 1000 / r["chunks"] for r in reps]),
                "ms": _median([r["ms"] for r in reps]),
                "others_cpu_pct": _median([r.get("othersCpuPct", 0) for r in reps]),
            }
        shapes = [(c, n) for cache_, c, n in concurrent if cache_ == cache]
        if shapes:
            c, n = min(shapes, key=lambda s: (abs(s[0] - runs), abs(s[1] - deltas)))
            reps = concurrent[(cache, c, n)]
            result["concurrent"][cache] = {
                "runs": c,
                "deltas": n,
                "reps": len(reps),
                "events_per_s": _median([r["chunksPerS"] for r in reps]),
                "cpu_us_per_event": _median([r["cpuMs"] * 1000 / r["chunks"] for r in reps]),
                "wall_ms": _median([r["wallMs"] for r in reps]),
                "others_cpu_pct": _median([r.get("othersCpuPct", 0) for r in reps]),
            }
    return result
