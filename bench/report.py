"""Write a benchmark run: a JSON file per run, and the latest as JSON, Markdown and PNG.

    OUT/runs/<UTC time>-<mode>.json   every run's full results, kept
    OUT/latest.json                   the same, for the latest run
    OUT/latest.md                     targets, figures with ratios, ceilings
    OUT/latest.png                    the ratios and targets as a chart

`python -m bench --render OUT/runs/X.json` rewrites latest.md/png from any run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench import analysis
from bench.procs import POSTGRES_BACKENDS, REDIS_VARIANTS

Params = dict[str, Any]
BACKENDS = ("memory", "redis", "temporal", *REDIS_VARIANTS, *POSTGRES_BACKENDS)
NONE = "\N{EN DASH}"  # a missing value in a table
TIMES = analysis.TIMES


def write(results: Params, out_dir: Path) -> list[Path]:
    """Write the run's JSON, then latest.{json,md,png}; returns the paths written."""
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = results["started_at"].replace(":", "").replace("-", "")
    run_json = runs / f"{stamp}-{results['mode']}.json"
    text = json.dumps(results, indent=1) + "\n"
    run_json.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return [run_json, out_dir / "latest.json", *render(results, out_dir)]


def render(results: Params, out_dir: Path) -> list[Path]:
    """latest.md and (with matplotlib) latest.png for `results`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "latest.md"]
    chart = out_dir / "latest.png"
    has_chart = write_chart(results, chart)
    if has_chart:
        written.append(chart)
    written[0].write_text(markdown(results, chart.name if has_chart else None))
    return written


# -- numbers ----------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    if unit == "share":
        return f"{value:.0%}"
    if unit == TIMES:
        return f"{value:.2f}{TIMES}"
    if unit in ("events/s", "messages/s", "runs/s"):
        return f"{value:,.0f}"
    if unit in ("MiB", "MB", "observers"):
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(ratio: float | None, better: str) -> str:
    if ratio is None:
        return NONE
    if better == "higher":
        return f"{ratio:.0%}"
    return f"{ratio:.1f}{TIMES}"


# -- Markdown -------------------------------------------------------------------


def markdown(results: Params, chart: str | None) -> str:
    machine = results["machine"]
    load = machine.get("load_average", {})
    lines = [
        f"# Keel benchmark: {results['mode']} run of {results['started_at']}",
        "",
        f"{results['duration_s']:.0f} s on {machine.get('cpus')} cores, load average "
        f"{load.get('start', '?')} before and {load.get('end', '?')} after; "
        f"Keel {machine.get('keel_commit', '?')}; Python {machine.get('python')}, "
        f"grpcio {machine.get('grpcio')}, redis-server {machine.get('redis_server')}"
        + (f", PostgreSQL {machine['postgres']}" if machine.get("postgres") else "")
        + ". "
        "How to read this: [README.md](README.md).",
        "",
    ]
    if results["mode"] != "full":
        lines += [
            "**A quick run**: its workloads are far smaller than the targets'; its",
            "numbers prove the benchmark runs, nothing more.",
            "",
        ]
    before = results.get("baseline")
    if before:
        lines += [
            f'**Before**: every "before" column is the run of {before.get("started_at")} '
            f"({before.get('mode')}, Keel {before.get('keel_commit')}, load average "
            f"{before.get('load_average', {}).get('start', '?')} before it), from "
            f"`{before.get('source')}`, analysed by this benchmark's code.",
            "",
        ]
    mastra = results.get("mastra")
    if mastra:
        lines += [
            f"**Mastra**: @mastra/core {mastra.get('mastra_core')} on Node "
            f"{mastra.get('node')}, its harness's results in `{mastra.get('source')}` "
            f"({', '.join(mastra.get('files', []))}).",
            "",
        ]
    if chart is not None:
        lines += [f"![Keel against its ceilings and targets]({chart})", ""]
    lines += _targets_table(results["targets"], before)
    lines += _figures_table(results["figures"], before)
    lines += _stores_table(results.get("stores_table"))
    lines += _cpu_table(results.get("cpu", []), before)
    lines += _workers_table(results.get("workers"), before, "workers", B_WORKERS)
    lines += _workers_table(results.get("live_workers"), before, "live_workers", H_WORKERS)
    lines += _mastra_table(results.get("mastra_rows", []), mastra)
    lines += _executors_table(results.get("executors", []), before)
    lines += _ceilings_table(results["ceilings"])
    lines += _checks(results["workloads"])
    return "\n".join(lines) + "\n"


# -- before and after -------------------------------------------------------------


def _cells(now: Any, then: Any, unit: str, with_before: bool) -> list[str]:
    """[before, now] or [now], each value with its unit."""
    cells = [_with_unit(now, unit)]
    return [_with_unit(then, unit), *cells] if with_before else cells


def _lookup(rows: list[Params] | None, *keys: str) -> dict[tuple[Any, ...], Params]:
    return {tuple(row.get(k) for k in keys): row for row in rows or []}


def _value(row: Params | None, backend: str, field: str = "value") -> Any:
    if row is None:
        return None
    return (row.get("backends", {}).get(backend) or {}).get(field)


def _shown(rows: list[Params]) -> tuple[str, ...]:
    """The columns of the targets and figures tables: memory and redis, each Redis
    variant that ran, and postgres if it ran (the Temporal executor has a table of its
    own)."""
    ran = {backend for row in rows for backend in row["backends"]}
    return ("memory", "redis", *(b for b in (*REDIS_VARIANTS, *POSTGRES_BACKENDS) if b in ran))


def _targets_table(targets: list[Params], before: Params | None = None) -> list[str]:
    shown = _shown(targets)
    heads = [f"{b} before | {b}" if before else b for b in shown]
    lines = [
        "## Targets",
        "",
        'A target names its backend when it is judged on one only ("on Redis"). A workload',
        "in brackets after a value is the way of running it the target was judged on: for h",
        '("the best way"), of one connection, several, and --workers, the one meeting the most',
        "of h's targets (then the one closest to meeting its worst); for Mastra, b's fastest.",
        "",
        f"| target | {' | '.join(heads)} | target |",
        "|---|" + "---|" * (len(shown) * (2 if before else 1)) + "---|",
    ]
    then = _lookup((before or {}).get("targets"), "target")
    for row in targets:
        old = then.get((row["target"],))
        cells = []
        for backend in shown:
            cell = row["backends"].get(backend)
            if before:
                was = _value(old, backend)
                verdict = "" if was is None else (" met" if _value(old, backend, "met") else "")
                way = _value(old, backend, "keel")
                way = f" ({way})" if was is not None and way else ""
                cells.append(f"{_with_unit(was, row['unit'])}{verdict}{way}")
            if cell is None:
                cells.append(NONE)
                continue
            verdict = "met" if cell["met"] else "**not met**"
            way = f" ({cell['keel']})" if cell.get("keel") else ""
            cells.append(f"{_with_unit(cell['value'], row['unit'])} {verdict}{way}")
        bound = "≤" if row["at_most"] else "≥"
        lines.append(
            f"| {row['target']} | {' | '.join(cells)} | "
            f"{bound} {_with_unit(row['threshold'], row['unit'])} |"
        )
    return [*lines, ""]


def _with_unit(value: float | None, unit: str) -> str:
    text = fmt(value, unit)
    return text if unit in ("share", "", TIMES) or text == NONE else f"{text} {unit}"


def _figures_table(figures: list[Params], before: Params | None = None) -> list[str]:
    shown = _shown(figures)
    heads = [f"{b} before | {b}" if before else b for b in shown]
    lines = [
        "## Keel against its ceilings",
        "",
        "Ratio: for rates, the share of the ceiling Keel reaches; for times, how many",
        "times the ceiling's time Keel takes. A ceiling is measured in the same run.",
        *(["With a before column, a ratio reads before → now."] if before else []),
        "",
        f"| workload | figure | {' | '.join(heads)} | ceiling | "
        + " | ".join(f"{b} ratio" for b in shown)
        + " |",
        "|---|---|" + "---|" * (len(shown) * (2 if before else 1)) + "---|" + "---|" * len(shown),
    ]
    then = _lookup((before or {}).get("figures"), "workload", "figure")
    for row in figures:
        unit = row["unit"]
        old = then.get((row["workload"], row["figure"]))
        values, ratios, ceilings = [], [], []
        for backend in shown:
            cell = row["backends"].get(backend)
            if before:
                values.append(_with_unit(_value(old, backend), unit))
            if cell is None:
                values.append(NONE)
                ratios.append(NONE)
                continue
            flag = "" if cell["ok"] else " (failed)"
            values.append(f"{_with_unit(cell['value'], unit)}{flag}")
            ratio = fmt_ratio(cell["ratio"], row["better"])
            was = _value(old, backend, "ratio")
            if before and (was is not None or cell["ratio"] is not None) and row["ceiling_name"]:
                ratio = f"{fmt_ratio(was, row['better'])} → {ratio}"
            ratios.append(ratio)
            if cell["ceiling"] is not None:
                ceilings.append(cell["ceiling"])
        ceiling = NONE
        if row["ceiling_name"]:
            shown_ceilings = " / ".join(dict.fromkeys(fmt(c, unit) for c in ceilings)) or NONE
            ceiling = f"{shown_ceilings} {unit}: {row['ceiling_name']}"
        lines.append(
            f"| {row['workload'][0]} | {row['figure']} | {' | '.join(values)} | "
            f"{ceiling} | {' | '.join(ratios)} |"
        )
    return [*lines, ""]


def _stores_table(table: Params | None) -> list[str]:
    """The same workloads on each Redis store, side by side (only when a variant ran)."""
    if not table:
        return []
    names = table["stores"]
    described = table.get("described") or {}
    about = []
    for name in names:
        store = described.get(name) or {}
        if store.get("kind") == "redis cluster":
            about.append(f"{name}: {store.get('nodes')} masters, no replicas, on this machine")
        elif store.get("appendonly"):
            extra = ""
            if store.get("aof_rewrites") or store.get("aof_delayed_fsync"):
                extra = (
                    f" ({store.get('aof_rewrites')} AOF rewrites, "
                    f"{store.get('aof_delayed_fsync')} delayed fsyncs)"
                )
            about.append(f"{name}: appendonly yes, appendfsync {store.get('appendfsync')}{extra}")
        elif store:
            about.append(f"{name}: no persistence")
    lines = [
        "## The same workloads on each Redis store",
        "",
        "Each store measured in this run: its raw Redis ceilings (redis-py and a Lua append",
        "on that store), then each figure of the workloads that ran on it, with its ratio to",
        "its ceiling (the figures table says which; on each store the raw Redis one is that",
        f"store's own), and the value against plain Redis's ({TIMES} redis).",
        *([f"Stores: {'; '.join(about)}."] if about else []),
        "",
        f"| workload | figure | {' | '.join(names)} |",
        "|---|---|" + "---|" * len(names),
    ]
    for row in table["rows"]:
        cells = []
        for name in names:
            cell = row["backends"].get(name)
            if cell is None or cell["value"] is None:
                cells.append(NONE)
                continue
            text = _with_unit(cell["value"], row["unit"])
            if cell.get("ok") is False:
                text += " (failed)"
            if cell["ratio"] is not None:
                text += f", ratio {fmt_ratio(cell['ratio'], row['better'])}"
            if name != "redis" and cell.get("vs_redis") is not None:
                text += f", {cell['vs_redis']:.2f}{TIMES} redis"
            cells.append(text)
        workload = row["workload"][:1] or "ceiling"
        lines.append(f"| {workload} | {row['figure']} | {' | '.join(cells)} |")
    return [*lines, ""]


def _cpu_table(rows: list[Params], before: Params | None = None) -> list[str]:
    if not rows:
        return []
    shown = [b for b in BACKENDS if any(r["backends"].get(b) is not None for r in rows)]
    heads = [f"{b} before | {b}" if before else b for b in shown]
    lines = [
        "## CPU per event",
        "",
        "CPU time (user + system, all threads, the server's worker processes included) over",
        "each client's measured part, divided by the events it received (µs/event) or the",
        "runs it made (ms/run). server: the Keel server (on temporal, the API server and",
        "its worker); redis: the redis-server; postgres: the PostgreSQL server (the",
        "postmaster and its backends); client: the measuring client process;",
        "in-process: the client process running the agent itself (workload f).",
        "",
        f"| workload | what | process | unit | {' | '.join(heads)} |",
        "|---|---|---|---|" + "---|" * (len(shown) * (2 if before else 1)),
    ]
    then = _lookup((before or {}).get("cpu"), "workload", "process")
    for row in rows:
        old = then.get((row["workload"], row["process"]))
        cells = []
        for backend in shown:
            if before:
                cells.append(fmt((old or {}).get("backends", {}).get(backend), ""))
            cells.append(fmt(row["backends"].get(backend), ""))
        lines.append(
            f"| {row['workload'][0]} | {row['name']} | {row['process']} | {row['unit']} | "
            f"{' | '.join(cells)} |"
        )
    return [*lines, ""]


# The workers tables: (workload, what the client does: {runs} and {connections} are
# filled in).
B_WORKERS = (
    "b",
    "The same client in both: {runs} concurrent runs, each on a connection of its own (the",
    "kernel hands each connection to one worker).",
)
H_WORKERS = (
    "h",
    "The same client in both: {runs} live runs, their streams spread round robin over",
    "{connections} connections (the kernel hands each connection, with its streams, to one",
    "worker). Peak RSS in MB (10^6 bytes), the unit of its target: all the server's",
    "processes (the parent and its workers, each one's own peak) and the largest of them.",
)


def _workers_table(
    workers: Params | None,
    before: Params | None,
    key: str,
    about: tuple[str, ...],
) -> list[str]:
    if not workers:
        return []
    count = workers.get("workers") or "N"
    workload, *text = about
    shape = {"{runs}": workers.get("runs"), "{connections}": workers.get("connections")}
    for name, value in shape.items():
        text = [line.replace(name, f"{value:,}" if value else "several") for line in text]
    lines = [
        f"## Workers: workload {workload} on Redis, one server process against --workers {count}",
        "",
        *text,
        "",
    ]
    if workers.get("skipped") or workers.get("errors"):
        why = workers.get("skipped") or "; ".join(workers["errors"])
        lines += [f"--workers: **{why}**", ""]
    split = workers.get("cpu_by_process_s")
    if split and len(split) > 1:
        total = sum(split) or 1.0
        shares = ", ".join(f"{value / total:.0%}" for value in split)
        lines += [f"How the server's CPU spread over its processes: {shares}.", ""]
    rss = workers.get("peak_rss_by_process_kib")
    if rss and len(rss) > 1:
        peaks = ", ".join(f"{kib * 1024 / 1e6:,.0f}" for kib in rss)
        lines += [f"Each process's peak RSS (MB, the parent first): {peaks}.", ""]
    then = {row["name"]: row for row in ((before or {}).get(key) or {}).get("rows", [])}
    heads = (
        "one process before | one process | workers before | workers"
        if before
        else ("one process | workers")
    )
    lines += [
        f"| figure | {heads} | workers / one |",
        "|---|" + "---:|" * (5 if before else 3),
    ]
    for row in workers["rows"]:
        old = then.get(row["name"], {})
        cells = [fmt(row["one"], "")]
        many = [fmt(row["many"], "")]
        if before:
            cells.insert(0, fmt(old.get("one"), ""))
            many.insert(0, fmt(old.get("many"), ""))
        ratio = NONE if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {row['name']} | {' | '.join(cells + many)} | {ratio} |")
    return [*lines, ""]


def _mastra_table(rows: list[Params], mastra: Params | None) -> list[str]:
    if not rows or not mastra:
        return []
    lines = [
        "## Keel against Mastra",
        "",
        "Mastra's durable agent (createDurableAgent) with a mock model streaming the same",
        "deltas, measured by its own harness (not in this run: compare with care). Its one",
        "process runs the agent, the event log and the consumer; its CPU excludes its Redis,",
        "as Keel's server CPU excludes Keel's. b on Redis (best): the best of workload b",
        "in one process and with --workers.",
        "",
        "| figure | Keel memory | Keel Redis | Keel Redis (best) | Mastra memory | "
        "Mastra Redis | Keel / Mastra (Redis) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        keel, peer = row["keel"], row["mastra"]
        best = NONE
        if "redis_best" in keel:
            best = f"{fmt(keel['redis_best'], '')} ({row.get('keel_best_is') or '?'})"
        ratio = NONE if row["ratio_redis"] is None else f"{row['ratio_redis']:.2f}"
        lines.append(
            f"| {row['name']} | {fmt(keel.get('memory'), '')} | {fmt(keel.get('redis'), '')} | "
            f"{best} | {fmt(peer.get('memory'), '')} | {fmt(peer.get('redis'), '')} | {ratio} |"
        )
    details = []
    for scenario in ("single", "concurrent"):
        for cache, values in (mastra.get(scenario) or {}).items():
            shape = (
                f"{values.get('runs')} x {values.get('deltas')} deltas"
                if scenario == "concurrent"
                else f"{values.get('deltas')} deltas"
            )
            details.append(
                f"{scenario} on {cache}: {shape}, {values.get('reps')} reps, other processes "
                f"used {values.get('others_cpu_pct')}% of the machine"
            )
    if details:
        lines += ["", "Mastra's measurements: " + "; ".join(details) + "."]
    return [*lines, ""]


def _executors_table(rows: list[Params], before: Params | None = None) -> list[str]:
    if not rows:
        return []
    then = _lookup((before or {}).get("executors"), "workload", "name")
    heads = "local before | local | temporal before | temporal" if before else "local | temporal"
    lines = [
        "## The Temporal executor against the local one (both on Redis, same run)",
        "",
        f"| workload | figure | {heads} | temporal / local |",
        "|---|---|" + "---:|" * (5 if before else 3),
    ]
    for row in rows:
        old = then.get((row["workload"], row["name"]), {})
        ratio = NONE if row["ratio"] is None else f"{row['ratio']:.2f}"
        local = [fmt(row["local"], "")]
        temporal = [fmt(row["temporal"], "")]
        if before:
            local.insert(0, fmt(old.get("local"), ""))
            temporal.insert(0, fmt(old.get("temporal"), ""))
        lines.append(
            f"| {row['workload']} | {row['name']} | {' | '.join(local + temporal)} | {ratio} |"
        )
    return [*lines, ""]


def _ceilings_table(ceilings: Params) -> list[str]:
    lines = ["## Ceilings of this run", "", "| ceiling | measured |", "|---|---|"]
    for name, value in ceilings.items():
        if name in ("redis", "postgres") or name.startswith(("redis@", "postgres@")):
            for key, sub in value.items():
                if isinstance(sub, dict) and "events_per_s" in sub:
                    lines.append(
                        f"| {name} {key} | {fmt(sub['events_per_s'], 'events/s')} events/s |"
                    )
                elif isinstance(sub, dict) and "ms" in sub:
                    lines.append(
                        f"| {name} {key} ({sub.get('events')} events) | {fmt(sub['ms'], 'ms')} ms |"
                    )
            continue
        if "messages_per_s" in value:
            lines.append(
                f"| {name} ({value.get('streams')} streams) | "
                f"{fmt(value['messages_per_s'], 'messages/s')} messages/s, "
                f"{fmt(value['events_per_s'], 'events/s')} events/s, "
                f"{fmt(value['total_ms'], 'ms')} ms in all |"
            )
        elif "p99_ms" in value:
            lines.append(
                f"| {name} ({value.get('streams')} streams) | p50 {fmt(value['p50_ms'], 'ms')} ms, "
                f"p99 {fmt(value['p99_ms'], 'ms')} ms, max {fmt(value['max_ms'], 'ms')} ms |"
            )
        else:
            lines.append(f"| {name} | failed: {'; '.join(value.get('errors', []))} |")
    return [*lines, ""]


def _checks(workloads: dict[str, dict[str, Params]]) -> list[str]:
    lines = [
        "## Every workload",
        "",
        "`ok`: every stream delivered every event from its offset to the terminal one,",
        "once and in order. Events per message: how many events one gRPC message carried.",
        "",
        "Server warnings: lines the server logged at WARNING or above meanwhile.",
        "",
        "| workload | backend | ok | events per message | server peak RSS | wall time | "
        "server warnings | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, per_backend in workloads.items():
        for backend, result in per_backend.items():
            rss = result.get("server_peak_rss_kib")
            ok = "yes" if result.get("ok") else "skipped" if result.get("skipped") else "**no**"
            lines.append(
                f"| {key} | {backend} | {ok} | "
                f"{fmt(result.get('events_per_message'), '')} | "
                f"{_with_unit(rss / 1024 if rss else None, 'MiB')} | "
                f"{fmt(result.get('wall_s'), 's')} s | {_warnings(result)} | "
                f"{'; '.join(result.get('errors', [])) or NONE} |"
            )
    return [*lines, ""]


def _warnings(result: Params) -> str:
    count = result.get("server_warnings")
    if not count:
        return NONE if count is None else "0"
    examples = "; ".join(dict.fromkeys(result.get("server_warning_examples", [])))
    return f"{count}: {examples}" if examples else str(count)


# -- the chart --------------------------------------------------------------------


def write_chart(results: Params, path: Path) -> bool:
    """Two panels: Keel against each ceiling, and each target's cost; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    figures = [
        row
        for row in results["figures"]
        if any(cell["efficiency"] for cell in row["backends"].values())
    ]
    targets = results["targets"]
    palette = {
        "memory": "#4C72B0",
        "redis": "#DD8452",
        "temporal": "#55A868",
        "redis-aof-everysec": "#C44E52",
        "redis-aof-always": "#8172B3",
        "cluster": "#937860",
        "postgres": "#336791",
        "postgres-sync": "#64B5CD",
    }
    ran = {b for row in [*results["figures"], *results["targets"]] for b in row["backends"]}
    colors = {b: color for b, color in palette.items() if b in ran or b in ("memory", "redis")}
    shown = list(colors)
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(14, max(4.5, 0.42 * len(figures) + 1.5)),
        gridspec_kw={"width_ratios": [3, 2]},
    )
    height = 0.38 if len(shown) <= 3 else 0.8 / len(shown)

    labels = [f"{row['workload'][0]}. {row['figure']}" for row in figures]
    for i, backend in enumerate(shown):
        for n, row in enumerate(figures):
            cell = row["backends"].get(backend) or {}
            if not cell.get("efficiency"):
                continue
            y = n + (i - 0.5 if len(shown) <= 3 else i - (len(shown) - 1) / 2) * height
            left.barh(y, cell["efficiency"], height=height, color=colors[backend])
            text = fmt_ratio(cell["ratio"], row["better"])
            left.text(cell["efficiency"] * 1.05, y, text, va="center", fontsize=7)
    largest = max((x for row in figures for x in _efficiencies(row)), default=1.0)
    _log_axis(left, 0.01, max(3.0, largest * 2))
    left.axvline(1.0, color="black", linewidth=1)
    left.set_yticks(range(len(figures)), labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("Keel / ceiling, as efficiency (1 = as good as the ceiling; higher is better)")
    left.set_title("Keel against the ceilings of the same run (labels: the ratio)")
    _legend(left, colors)

    target_labels = [row["target"] for row in targets]
    for i, backend in enumerate(shown):
        for n, row in enumerate(targets):
            cell = row["backends"].get(backend) or {}
            if not cell.get("cost"):
                continue
            y = n + (i - 0.5 if len(shown) <= 3 else i - (len(shown) - 1) / 2) * height
            right.barh(y, cell["cost"], height=height, color=colors[backend])
            text = _with_unit(cell["value"], row["unit"])
            if cell.get("keel"):  # judged on the best of the workload's ways: which
                text += f" ({cell['keel']})"
            right.text(cell["cost"] * 1.05, y, text, va="center", fontsize=7)
    costs = [c["cost"] for row in targets for c in row["backends"].values() if c.get("cost")]
    _log_axis(right, min([0.1, *costs]) / 1.5, max([10.0, *costs]) * 3)
    right.axvline(1.0, color="black", linewidth=1, linestyle="--")
    right.set_yticks(range(len(targets)), [_wrap(t, 34) for t in target_labels], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("value / target (1 or less: met)")
    right.set_title("The targets (labels: the value)")
    _legend(right, colors)

    fig.suptitle(
        f"Keel benchmark, {results['mode']} run of {results['started_at']} "
        f"({results['machine'].get('cpus')} cores)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _log_axis(axes: Any, low: float, high: float) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    axes.set_xscale("log")
    axes.set_xlim(low, high)
    ticks = [
        t for t in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300) if low <= t <= high
    ]
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([f"{t:g}" for t in ticks])


def _legend(axes: Any, colors: dict[str, str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=backend) for backend, color in colors.items()]
    axes.legend(handles=handles, loc="lower right", fontsize=8)


def _efficiencies(row: Params) -> list[float]:
    return [cell["efficiency"] for cell in row["backends"].values() if cell["efficiency"]]


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)
