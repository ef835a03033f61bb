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

Params = dict[str, Any]
BACKENDS = ("memory", "redis", "temporal")
NONE = "\N{EN DASH}"  # a missing value in a table
TIMES = "\N{MULTIPLICATION SIGN}"


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
    if unit in ("events/s", "messages/s"):
        return f"{value:,.0f}"
    if unit in ("MiB", "observers"):
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
        f"grpcio {machine.get('grpcio')}, redis-server {machine.get('redis_server')}. "
        "How to read this: [README.md](README.md).",
        "",
    ]
    if results["mode"] != "full":
        lines += [
            "**A quick run**: its workloads are far smaller than the targets'; its",
            "numbers prove the benchmark runs, nothing more.",
            "",
        ]
    if chart is not None:
        lines += [f"![Keel against its ceilings and targets]({chart})", ""]
    lines += _targets_table(results["targets"])
    lines += _figures_table(results["figures"])
    lines += _executors_table(results.get("executors", []))
    lines += _ceilings_table(results["ceilings"])
    lines += _checks(results["workloads"])
    return "\n".join(lines) + "\n"


def _targets_table(targets: list[Params]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "| target | memory | redis | target |",
        "|---|---|---|---|",
    ]
    for row in targets:
        cells = []
        for backend in BACKENDS:
            cell = row["backends"].get(backend)
            if cell is None:
                cells.append(NONE)
                continue
            verdict = "met" if cell["met"] else "**not met**"
            cells.append(f"{_with_unit(cell['value'], row['unit'])} {verdict}")
        bound = "≤" if row["at_most"] else "≥"
        lines.append(
            f"| {row['target']} | {cells[0]} | {cells[1]} | "
            f"{bound} {_with_unit(row['threshold'], row['unit'])} |"
        )
    return [*lines, ""]


def _with_unit(value: float | None, unit: str) -> str:
    text = fmt(value, unit)
    return text if unit in ("share", "") or text == NONE else f"{text} {unit}"


def _figures_table(figures: list[Params]) -> list[str]:
    lines = [
        "## Keel against its ceilings",
        "",
        "Ratio: for rates, the share of the ceiling Keel reaches; for times, how many",
        "times the ceiling's time Keel takes. A ceiling is measured in the same run.",
        "",
        "| workload | figure | memory | redis | ceiling | memory ratio | redis ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in figures:
        unit = row["unit"]
        values, ratios, ceilings = [], [], []
        for backend in BACKENDS:
            cell = row["backends"].get(backend)
            if cell is None:
                values.append(NONE)
                ratios.append(NONE)
                continue
            flag = "" if cell["ok"] else " (failed)"
            values.append(f"{_with_unit(cell['value'], unit)}{flag}")
            ratios.append(fmt_ratio(cell["ratio"], row["better"]))
            if cell["ceiling"] is not None:
                ceilings.append(cell["ceiling"])
        ceiling = NONE
        if row["ceiling_name"]:
            shown = " / ".join(dict.fromkeys(fmt(c, unit) for c in ceilings)) or NONE
            ceiling = f"{shown} {unit}: {row['ceiling_name']}"
        lines.append(
            f"| {row['workload'][0]} | {row['figure']} | {values[0]} | {values[1]} | "
            f"{ceiling} | {ratios[0]} | {ratios[1]} |"
        )
    return [*lines, ""]


def _executors_table(rows: list[Params]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## The Temporal executor against the local one (both on Redis, same run)",
        "",
        "| workload | figure | local | temporal | temporal / local |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = NONE if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(
            f"| {row['workload']} | {row['name']} | {fmt(row['local'], '')} | "
            f"{fmt(row['temporal'], '')} | {ratio} |"
        )
    return [*lines, ""]


def _ceilings_table(ceilings: Params) -> list[str]:
    lines = ["## Ceilings of this run", "", "| ceiling | measured |", "|---|---|"]
    for name, value in ceilings.items():
        if name == "redis":
            for key, sub in value.items():
                if isinstance(sub, dict) and "events_per_s" in sub:
                    lines.append(
                        f"| redis {key} | {fmt(sub['events_per_s'], 'events/s')} events/s |"
                    )
                elif isinstance(sub, dict) and "ms" in sub:
                    lines.append(
                        f"| redis {key} ({sub.get('events')} events) | {fmt(sub['ms'], 'ms')} ms |"
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
        "| workload | backend | ok | events per message | server peak RSS | wall time | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, per_backend in workloads.items():
        for backend, result in per_backend.items():
            rss = result.get("server_peak_rss_kib")
            lines.append(
                f"| {key} | {backend} | {'yes' if result.get('ok') else '**no**'} | "
                f"{fmt(result.get('events_per_message'), '')} | "
                f"{fmt(rss / 1024 if rss else None, 'MiB')} MiB | "
                f"{fmt(result.get('wall_s'), 's')} s | "
                f"{'; '.join(result.get('errors', [])) or NONE} |"
            )
    return [*lines, ""]


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
    colors = {"memory": "#4C72B0", "redis": "#DD8452", "temporal": "#55A868"}
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(14, max(4.5, 0.42 * len(figures) + 1.5)),
        gridspec_kw={"width_ratios": [3, 2]},
    )
    height = 0.38

    labels = [f"{row['workload'][0]}. {row['figure']}" for row in figures]
    for i, backend in enumerate(BACKENDS):
        for n, row in enumerate(figures):
            cell = row["backends"].get(backend) or {}
            if not cell.get("efficiency"):
                continue
            y = n + (i - 0.5) * height
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
    for i, backend in enumerate(BACKENDS):
        for n, row in enumerate(targets):
            cell = row["backends"].get(backend) or {}
            if not cell.get("cost"):
                continue
            y = n + (i - 0.5) * height
            right.barh(y, cell["cost"], height=height, color=colors[backend])
            text = _with_unit(cell["value"], row["unit"])
            right.text(cell["cost"] * 1.05, y, text, va="center", fontsize=7)
    _log_axis(right, 0.1, 10.0)
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
    ticks = [t for t in (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30) if low <= t <= high]
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
