"""A run's lineage: which incarnation of the store wrote which stretch of its log.

An incarnation is an opaque id of one life of the store that may not have
kept everything the one before it held: on Redis, the run_id each
redis-server process draws when it starts (so a restart, from whatever
files, and a failover to a replica are each a new incarnation; incarnation.py).
The first append a run gets in a new incarnation records where that
incarnation's stretch starts, so the lineage reads "A@0,B@120": events
0..119 were written by A, those from 120 on by B.

A store that came back with an older state holds a prefix of the run's old
log and carries on from its end; the indices from there on are written
again, with other events. A client that holds events up to offset - 1, the
last of them written in incarnation I, still holds the log's history if I
is in the lineage and the stretch after I's (if any) starts at or after
offset, and the log's head has not fallen below offset. Otherwise it holds
events the log no longer has (LogRolledBack).

The in-memory log never goes back: its runs have no lineage, and only the
head is checked.
"""

from __future__ import annotations

from server.errors import LogRolledBack

Lineage = tuple[tuple[str, int], ...]  # (incarnation, first index it wrote), in order


def parse(text: str) -> Lineage:
    """A lineage as the store keeps it: "A@0,B@120" ("" for none)."""
    if not text:
        return ()
    stretches = []
    for part in text.split(","):
        incarnation, _, start = part.rpartition("@")
        stretches.append((incarnation, int(start)))
    return tuple(stretches)


def latest(text: str) -> str:
    """The incarnation that wrote the run's latest events ("" for none)."""
    return text.rpartition(",")[2].rpartition("@")[0]


def incarnation_at(lineage: Lineage, index: int) -> str:
    """The incarnation that wrote event `index` ("" if the lineage does not say)."""
    found = ""
    for incarnation, start in lineage:
        if start > index:
            break
        found = incarnation
    return found


def check(run_id: str, text: str, incarnation: str, offset: int, head: int) -> None:
    """Raise LogRolledBack if a client that holds events up to offset - 1, the last written
    in `incarnation`, holds events the log no longer has (see the module docstring).
    Nothing is checked without an incarnation, or at offset 0 (nothing is held)."""
    if not incarnation or offset == 0:
        return
    lineage = parse(text)
    diverged_at: int | None = None
    if lineage:
        incarnations = [name for name, _ in lineage]
        if incarnation not in incarnations:
            # Everything that incarnation wrote is gone, from an index nobody knows.
            raise LogRolledBack(run_id, offset, head, incarnation, None)
        at = len(incarnations) - 1 - incarnations[::-1].index(incarnation)
        if at + 1 < len(lineage) and lineage[at + 1][1] < offset:
            diverged_at = lineage[at + 1][1]
    if offset > head:
        diverged_at = head if diverged_at is None else min(diverged_at, head)
    if diverged_at is not None:
        raise LogRolledBack(run_id, offset, head, incarnation, diverged_at)
