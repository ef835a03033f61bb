"""Summarize py-spy's raw (collapsed) profiles: `python -m bench.profiles FILE.txt [--top N]`.

`scripts/bench --py-spy $(which py-spy)` records one file per workload and
backend under build/bench/<run>/profiles/. Each line of such a file is a stack
(`frame;frame;...`, outermost first) and its sample count. This prints the
share of samples each package was on top of the stack (self), the frames
with the most samples on top of the stack and anywhere in it (inclusive),
so hot spots can be named with numbers. py-spy records without pausing the
server (--nonblocking), so some stacks come back cut short: self shares are
sound, inclusive ones are lower bounds. (The files also load into speedscope or
flamegraph.pl as they are.)
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _short(frame: str) -> str:
    # py-spy frames read "function (path/to/module.py:line)"; keep the module's last two parts.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    tail = "/".join(path.split("/")[-2:]) if path else where
    return f"{name} ({tail})"


def _package(frame: str) -> str:
    """Who owns a frame: its top-level package ("server/runs" for Keel's own code)."""
    name, _, where = frame.partition(" (")
    path = where.rpartition(":")[0]
    parts = path.split("/")
    if name == "Handle._run":
        # Self time here is C code run by event-loop callbacks: mostly grpc's Cython.
        return "C under the event loop (grpc, protobuf)"
    if parts[0] == "server" and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0] if path else name


def summarize(path: Path, top: int = 25) -> str:
    stacks = load(path)
    total = sum(count for _, count in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        if not frames:
            continue
        own[_short(frames[-1])] += count
        packages[_package(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += count
    lines = [f"{path.name}: {total} samples", "", "self, by package:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in packages.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profiles", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        print(summarize(path, args.top))
        print()


if __name__ == "__main__":
    main()
