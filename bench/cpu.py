"""CPU time of processes and their descendants, from /proc (Linux).

A Keel server started with `--workers N` runs its workers as child processes;
its CPU is the parent's plus every descendant's. Each process's share is
utime + stime (all its threads) plus cutime + cstime (children it has already
waited for), in clock ticks of 1 / SC_CLK_TCK s (10 ms on Linux). A child
that exits between two samples moves from the walk to its parent's cutime
and stime once it is reaped, so the sum stays continuous.

Both sides of a measurement read the same clock, so a delta over a window of
a second or more is good to about 1 %; deltas over shorter windows are not
meaningful.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, in seconds; 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    return sum(int(value) for value in fields[11:15]) * TICK_S


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks after boot): tells a pid's reuse apart."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return found


def tree(pids: Iterable[int]) -> list[int]:
    """The processes `pids` and all their descendants."""
    every: list[int] = []
    for pid in pids:
        every += [pid, *descendants(pid)]
    return list(dict.fromkeys(every))


def per_process_cpu_s(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each of `pids` and their descendants, by pid."""
    return {pid: process_cpu_s(pid) for pid in tree(pids)}


def tree_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds of `pids` and all their descendants (see the module's docstring)."""
    return sum(process_cpu_s(pid) for pid in tree(pids))


@dataclass
class Meter:
    """Adds up the CPU time of some process trees over windows: start(), stop(), ...

    `pids` empty: this process alone, by time.process_time().
    """

    pids: tuple[int, ...] = ()
    total_s: float = 0.0
    _started: float | None = field(default=None, repr=False)

    def _now(self) -> float:
        return tree_cpu_s(self.pids) if self.pids else time.process_time()

    def start(self) -> None:
        self._started = self._now()

    def stop(self) -> float:
        """End the window; returns its CPU seconds (also added to total_s)."""
        if self._started is None:
            return 0.0
        delta = self._now() - self._started
        self._started = None
        self.total_s += delta
        return delta
