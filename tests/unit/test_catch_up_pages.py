"""Shared catch-up pages hand out slices that reuse the page's encoding, byte for byte, cut
after the first event that ends a stream."""

from __future__ import annotations

from keel.v1.agent_service_pb2 import AgentEvent, EventBatch

from server.events.codec import Batch, encode_batch, event_starts, serialize_events
from server.observe.catchup import _SharedPage

NONE: frozenset[str] = frozenset()
SUSPENDED = frozenset({"suspended", "finish"})


def _events(sizes: list[int]) -> list[AgentEvent]:
    events = []
    for index, size in enumerate(sizes):
        event = AgentEvent(run_id="r", index=100 + index, step=1, attempt=1)
        event.text_delta.delta = "x" * size
        events.append(event)
    return events


def _encoded(events: list[AgentEvent]) -> bytes:
    return EventBatch(events=events).SerializeToString()


def test_every_tail_of_a_shared_page_is_the_encoding_of_its_events() -> None:
    # Events whose lengths need one, two and three varint bytes.
    events = _events([0, 5, 120, 200, 5000, 20_000, 3, 70_000, 1])
    page = _SharedPage(Batch(events, encode_batch(serialize_events(events))))
    for skip in range(len(events)):
        tail, end = page.cut(skip, NONE)
        assert isinstance(tail, Batch) and not end
        assert list(tail) == events[skip:]
        assert tail.encoded == _encoded(events[skip:])
    assert page.cut(0, NONE) == (page.batch, False)
    assert page.cut(0, NONE)[0] is page.batch


def test_a_page_is_cut_after_the_first_event_that_ends_the_stream() -> None:
    events = _events([3] * 10)
    events[4].suspended.SetInParent()
    events[7].suspended.SetInParent()
    page = _SharedPage(Batch(events, encode_batch(serialize_events(events))))
    for skip, stop in [(0, 5), (4, 5), (5, 8), (7, 8)]:
        cut, end = page.cut(skip, SUSPENDED)
        assert end and list(cut) == events[skip:stop]
        assert isinstance(cut, Batch) and cut.encoded == _encoded(events[skip:stop])
    cut, end = page.cut(8, SUSPENDED)
    assert not end and list(cut) == events[8:]
    cut, end = page.cut(2, NONE)  # a stream that does not stop at suspensions
    assert not end and list(cut) == events[2:]


def test_a_page_encoded_lazily_is_cut_the_same_way() -> None:
    events = _events([10] * 50)
    page = _SharedPage(Batch(events))  # the memory log's pages are encoded on first use
    cut, _ = page.cut(17, NONE)
    assert isinstance(cut, Batch) and cut.encoded == _encoded(events[17:])


def test_an_encoding_that_is_not_plain_concatenated_events_is_not_cut() -> None:
    events = _events([4, 4])
    plain = encode_batch(serialize_events(events))
    assert event_starts(plain, 2) == [0, len(plain) // 2]
    assert event_starts(plain + b"\x10\x01", 2) == []  # another field after the events
    assert event_starts(plain, 3) == []  # fewer events than the page holds
    assert event_starts(plain[:-1], 2) == []  # truncated
    odd = _SharedPage(Batch(events, plain + b"\x10\x01"))
    cut, _ = odd.cut(1, NONE)
    assert not isinstance(cut, Batch) and list(cut) == events[1:]  # encoded again when sent
