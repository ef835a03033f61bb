"""Shared catch-up pages hand out tails that reuse the page's encoding, byte for byte."""

from __future__ import annotations

from keel.v1.agent_service_pb2 import AgentEvent, EventBatch

from server.events.codec import Batch, encode_batch, serialize_events
from server.observe.catchup import _SharedPage, _starts


def _events(sizes: list[int]) -> list[AgentEvent]:
    events = []
    for index, size in enumerate(sizes):
        event = AgentEvent(run_id="r", index=100 + index, step=1, attempt=1)
        event.text_delta.delta = "x" * size
        events.append(event)
    return events


def test_every_tail_of_a_shared_page_is_the_encoding_of_its_events() -> None:
    # Events whose lengths need one, two and three varint bytes.
    events = _events([0, 5, 120, 200, 5000, 20_000, 3, 70_000, 1])
    page = _SharedPage(Batch(events, encode_batch(serialize_events(events))))
    for skip in range(len(events)):
        tail = page.tail(skip)
        assert isinstance(tail, Batch)
        assert list(tail) == events[skip:]
        assert tail.encoded == EventBatch(events=events[skip:]).SerializeToString()
    assert page.tail(0) is page.batch


def test_a_page_encoded_lazily_is_cut_the_same_way() -> None:
    events = _events([10] * 50)
    page = _SharedPage(Batch(events))  # the memory log's pages are encoded on first use
    assert page.tail(17).encoded == EventBatch(events=events[17:]).SerializeToString()


def test_an_encoding_that_is_not_plain_concatenated_events_is_not_cut() -> None:
    events = _events([4, 4])
    plain = encode_batch(serialize_events(events))
    assert _starts(plain, 2) == [0, len(plain) // 2]
    assert _starts(plain + b"\x10\x01", 2) == []  # another field after the events
    assert _starts(plain, 3) == []  # fewer events than the page holds
    assert _starts(plain[:-1], 2) == []  # truncated
    odd = _SharedPage(Batch(events, plain + b"\x10\x01"))
    tail = odd.tail(1)
    assert not isinstance(tail, Batch) and list(tail) == events[1:]  # encoded again when sent
