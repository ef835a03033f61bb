"""Checks and encodings shared by the EventLog implementations."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from keel.v1.agent_service_pb2 import AgentEvent

# Wire tag of EventBatch.events (field 1, length-delimited): (1 << 3) | 2.
_EVENTS_TAG = b"\x0a"
# Tag plus length prefix of an event, precomputed for the common sizes (a
# lookup is several times faster than encoding the varint each time).
_SMALL_EVENT_BYTES = 4096


class Batch(list[AgentEvent]):
    """Consecutive committed events, and their serialized EventBatch, encoded at most once.

    What the logs hand to listeners and readers: a batch fanned out to many
    observers is serialized once, not once per observer (server/api sends
    `encoded` as is). A slice of a Batch is a plain list: it has no encoding.
    """

    __slots__ = ("_encoded",)

    def __init__(self, events: Iterable[AgentEvent] = (), encoded: bytes | None = None) -> None:
        super().__init__(events)
        self._encoded = encoded

    @property
    def encoded(self) -> bytes:
        if self._encoded is None:
            self._encoded = encode_batch(serialize_events(self))
        return self._encoded


def check_consecutive(events: Sequence[AgentEvent]) -> None:
    """Raise ValueError unless the events' indices are consecutive (a caller's bug)."""
    first = events[0].index if events else 0
    for offset, event in enumerate(events):
        if event.index != first + offset:
            raise ValueError(
                f"event indices must be consecutive: expected {first + offset}, got {event.index}"
            )


def serialize_events(events: Sequence[AgentEvent]) -> list[bytes]:
    """Each event serialized once; the bytes are both the ZSET members and the published batch."""
    return [event.SerializeToString() for event in events]


def encode_batch(members: Sequence[bytes]) -> bytes:
    """The serialized EventBatch holding these serialized AgentEvents.

    A repeated message field is each element prefixed with its tag and length,
    so concatenating saves copying every event into an EventBatch and
    serializing it a second time. tests/contract checks this against
    EventBatch.SerializeToString.
    """
    heads = _HEADS
    parts: list[bytes] = []
    for member in members:
        size = len(member)
        parts.append(heads[size] if size < _SMALL_EVENT_BYTES else _EVENTS_TAG + varint(size))
        parts.append(member)
    return b"".join(parts)


def event_starts(encoded: bytes, count: int) -> list[int]:
    """Where each of the `count` events of an encoded EventBatch starts ([] if it is not
    the plain concatenation of tagged, length-prefixed events that encode_batch makes)."""
    starts: list[int] = []
    position = 0
    end = len(encoded)
    for _ in range(count):
        if position >= end or encoded[position] != _EVENTS_TAG[0]:
            return []
        starts.append(position)
        position += 1
        size = shift = 0
        while True:  # the varint length
            if position >= end:
                return []
            byte = encoded[position]
            position += 1
            size |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        position += size
    return starts if position == end else []


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_HEADS = [_EVENTS_TAG + varint(size) for size in range(_SMALL_EVENT_BYTES)]
