"""The HTTP port's codecs: protobuf binary and JSON, for messages and for pre-encoded batches.

The servicer hands a run's event batches to every transport already
encoded in binary, once per batch whichever number of streams carry it
(servicer._events_response). gRPC sends those bytes as they are; so does
the binary codec here, for Connect and gRPC-Web, instead of decoding and
encoding them again. The JSON codec decodes a batch once and keeps the
last one's JSON, so the streams of one run that read the same batch share
that work too. JSON goes out compact, on one line (connectrpc's own codec
indents it, which costs a third more time and bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from connectrpc.codec import Codec
from google.protobuf import json_format
from google.protobuf.message import Message

from server.api.convert import LastBatch


@dataclass(frozen=True, slots=True, eq=False)
class Encoded:
    """A response message already encoded in binary, and its type (to decode it for JSON)."""

    data: bytes
    message_type: type[Message]


class BinaryCodec(Codec[Any, Any]):
    def name(self) -> str:
        return "proto"

    def encode(self, message: Message | Encoded) -> bytes:
        if isinstance(message, Encoded):
            return message.data
        return message.SerializeToString()

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Message:
        return message_class.FromString(bytes(data))


class JSONCodec(Codec[Any, Any]):
    """Protobuf's canonical JSON; fields it does not know are ignored when decoding, as
    binary protobuf ignores unknown fields (so newer clients' requests keep working)."""

    def __init__(self) -> None:
        self._last_batch = LastBatch[bytes]()  # its JSON

    def name(self) -> str:
        return "json"

    def encode(self, message: Message | Encoded) -> bytes:
        if not isinstance(message, Encoded):
            return to_json(message).encode()
        message_type = message.message_type
        return self._last_batch.get(
            message.data, lambda data: to_json(message_type.FromString(data)).encode()
        )

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Message:
        message = message_class()
        json_format.Parse(bytes(data), message, ignore_unknown_fields=True)
        return message


def to_json(message: Message) -> str:
    """Canonical JSON on one line, with the C encoder (MessageToJson's indent needs Python's)."""
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":"))


CODECS = (BinaryCodec(), JSONCodec())
