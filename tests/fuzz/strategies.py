"""Hypothesis strategies for protobuf messages and for garbage in their place, derived from
the messages' descriptors, so a field added to the contract is fuzzed without a test edit.

`Messages(hints).message(descriptor)` makes messages of that type: each field is absent or
holds a value of its type, drawn to hurt the server:

- strings: any Unicode (non-ASCII, control characters, NUL; lone surrogates cannot be in a
  proto string), empty, lengths at the usual limits, and oversized (100 KB to a few MB);
- bytes: random, empty and oversized;
- integers: their type's extremes (int64's too), negatives, and anything in between;
- floats: NaN, infinities, negative zero and the rest;
- enums: the defined numbers and undefined ones (proto3 enums are open: any int32 goes);
- messages: nested up to a depth, repeated fields and maps up to a length, one member of a
  oneof (or none);
- well-known types: Timestamp and Duration with valid and out-of-range seconds and nanos,
  FieldMask with paths that name the request's fields, nested paths and random text.

Half of the messages are wild like that, half plausible (short ASCII, small numbers,
defined enum numbers, valid timestamps). Hints add values the generic ones would hardly
ever hit (ids that exist, valid JSON, page tokens the server issued): a hint keyed by a
field's full name ("keel.v1.Goal.objective") or its name ("run_id") is drawn instead of
the generic value two times out of three (always in a plausible message).
`Messages.mutants(descriptor, corpus)` changes one to three fields of messages that worked:
cleared, set anew, or `perturbed` (a value of the JSON a string holds, or of the base64
JSON of a page token, set to an edge value).

`raw_bodies(descriptor, messages)` makes request bodies that are not messages of that type:
random bytes, a valid encoding truncated or with bytes changed, fields with a wrong wire
type or invalid UTF-8, overlong varints, and unknown fields nested past any parser's limit.
`json_mutants(document)` does the same for a message's JSON (the HTTP port's Connect JSON):
values of the wrong type, null, numbers past every type, deep nesting, bad base64, invalid
UTF-8, unknown fields, the text cut or with garbage around it.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor
Hints = Mapping[str, st.SearchStrategy[Any]]

INT_RANGES: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
# Lengths at which limits usually sit (ids, keys, values), and one past them.
EDGE_LENGTHS = (1, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1024, 1025, 4096)
# Oversized: 100 KB up to past the server's 4 MiB message limit (with 4-byte characters).
OVERSIZED_LENGTHS = (100_000, 1 << 20, (1 << 20) + 1, 1_100_000)
ODD_STRINGS = (
    "",
    " ",
    "\x00",
    "\n",
    "\t\r\n",
    "\x7f",
    "{x}",
    "{",
    "}",
    "*",
    "..",
    "../..",
    "/",
    "%s%n",
    "a b",
    "null",
    "{}",
    "[]",
    '"',
    "\\",
    "\u202e",
    "\ufeff",
    "\u0085",
    "\u2028",
    "\ufffd",
    "\U0010ffff",
    "☃",
    "\U0001d54f",  # a 4-byte character
    "\u00e9",
    "e\u0301",  # the same, decomposed
)
ODD_UNITS = ("x", "é", "☃", "\U0001d54f", "\x00", "{", " ", "ab")


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `choices`, each drawn with the weight given it."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def oversized_strings() -> st.SearchStrategy[str]:
    """Strings of 100 KB and more: one short unit repeated (cheap for Hypothesis to draw)."""
    return st.builds(
        lambda unit, length: (unit * length)[:length],
        st.sampled_from(ODD_UNITS),
        st.sampled_from(OVERSIZED_LENGTHS),
    )


def strings(*, oversized: bool = True) -> st.SearchStrategy[str]:
    """Any text a proto string may hold, weighted towards what breaks parsers and limits."""
    choices: list[tuple[int, st.SearchStrategy[Any]]] = [
        (3, st.text(max_size=40)),  # any code point but surrogates, controls included
        (2, st.text(st.characters(codec="ascii"), max_size=40)),
        (1, st.text(st.characters(codec="utf-8", min_codepoint=0x80), max_size=20)),
        (2, st.sampled_from(ODD_STRINGS)),
        (
            1,
            st.builds(
                lambda unit, length: (unit * length)[:length],
                st.sampled_from(ODD_UNITS),
                st.sampled_from(EDGE_LENGTHS),
            ),
        ),
    ]
    if oversized:
        choices.append((1, oversized_strings()))
    return weighted(*choices)


def byte_strings() -> st.SearchStrategy[bytes]:
    return weighted(
        (4, st.binary(max_size=64)),
        (1, st.sampled_from([b"", b"\x00", b"\xff" * 16])),
        (
            1,
            st.builds(
                lambda b, n: b * n, st.sampled_from([b"\x00", b"\xff", b"ab"]), st.just(100_000)
            ),
        ),
    )


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers in [low, high], often at its ends, around zero or at 32-bit edges."""
    candidates: tuple[int, ...] = (low, low + 1, -(2**31) - 1, -(2**31), -1, 0, 1, 2, 2**31 - 1)
    candidates += (2**31, 2**32 - 1, 2**53 + 1, high - 1, high)
    edges = sorted({v for v in candidates if low <= v <= high})
    return weighted(
        (2, st.sampled_from(edges)),
        (2, st.integers(max(low, -1000), min(high, 1000))),
        (1, st.integers(low, high)),
    )


def floats(width: Literal[32, 64]) -> st.SearchStrategy[float]:
    return weighted(
        (1, st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1.5])),
        (2, st.floats(width=width)),
    )


def enum_numbers(enum: EnumDescriptor) -> st.SearchStrategy[int]:
    """The enum's numbers, and numbers it does not define (an open enum accepts any int32)."""
    defined = sorted(v.number for v in enum.values)
    undefined = [n for n in (-1, max(defined) + 1, 2**31 - 1, -(2**31)) if n not in defined]
    return weighted(
        (3, st.sampled_from(defined)),
        (1, st.sampled_from(undefined)),
        (1, st.integers(-(2**31), 2**31 - 1)),
    )


# JSON values where a number or a string is expected: past int64 and float, NaN, a bool.
EDGE_JSON: list[Any] = [10**30, 2**63, 2**63 - 1, 2**64, -1, -(2**63) - 1, 2**53 + 1, 10**400]
EDGE_JSON += [1e300, 0.5, math.inf, -math.inf, math.nan, True, False, None, "", "x", [], {}]


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Values json.dumps can write: numbers at the edges (huge, inf, NaN) and odd text."""
    leaves = st.one_of(
        st.sampled_from(EDGE_JSON),
        st.booleans(),
        integers(-(2**63), 2**63),
        st.floats(),
        st.text(max_size=20),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=10), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def deep_json() -> st.SearchStrategy[str]:
    """JSON nested past parsers' limits (Python's is about 1,000), closed or not."""
    return st.builds(
        lambda nest, depth: nest[0] * depth + nest[1] + nest[2] * depth,
        st.sampled_from([("[", "", "]"), ('{"a":', "0", "}"), ("[", "", "")]),
        st.sampled_from([100, 300, 500, 900, 990, 1000, 100_000]),
    )


def json_texts() -> st.SearchStrategy[str]:
    """JSON a parser may choke on: deep nesting, huge numbers, escaped lone surrogates,
    NaN and Infinity, duplicate keys, trailing garbage, and plain valid JSON."""
    return weighted(
        (4, json_values().map(json.dumps)),
        (1, deep_json()),
        (
            2,
            st.sampled_from(
                [
                    '"\\ud800"',
                    '{"a": "\\udfff"}',
                    "NaN",
                    "-Infinity",
                    "1e999999",
                    "9" * 5000,
                    '{"a": 1, "a": 2}',
                    "[1] x",
                    "{",
                    "",
                    "\x00",
                    "{}",
                    "[]",
                    "0",
                    '""',
                ]
            ),
        ),
    )


def tokens_of(bodies: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """Page tokens as base64 of JSON holding `bodies`, and broken base64."""
    return weighted(
        (3, bodies.map(lambda body: base64.urlsafe_b64encode(json.dumps(body).encode()).decode())),
        (
            1,
            json_texts().map(lambda text: base64.urlsafe_b64encode(text.encode()).decode()),
        ),
        (1, st.sampled_from(["=", "a", "abc", "####", "e30", "e30=", "\u00e9\u00e9\u00e9\u00e9"])),
    )


def perturbed(value: str) -> st.SearchStrategy[str]:
    """`value` changed a little: a value of the JSON object it holds (as text, or as base64
    of it like a page token) set to an edge value; other text cut, doubled or extended."""
    body, encoded = _json_object(value)
    if body is None:
        return st.builds(
            lambda edit, extra: [value[: len(value) // 2], value * 2, value + extra][edit],
            st.integers(0, 2),
            st.sampled_from(ODD_STRINGS),
        )
    replacements = weighted((3, st.sampled_from(EDGE_JSON)), (1, json_values(4)))

    def forge(changes: dict[str, Any]) -> str:
        text = json.dumps({**body, **changes})
        return base64.urlsafe_b64encode(text.encode()).decode() if encoded else text

    keys = sorted(body) or ["x"]
    return st.builds(lambda key, new: forge({key: new}), st.sampled_from(keys), replacements)


def _json_object(value: str) -> tuple[dict[str, Any] | None, bool]:
    """The JSON object `value` holds, and whether as base64 (None: it holds none)."""
    for encoded in (False, True):
        try:
            text = base64.urlsafe_b64decode(value.encode()).decode() if encoded else value
            body = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(body, dict):
            return body, encoded
    return None, False


# JSON mutations (json_mutants): numbers past every integer and float type, as JSON text;
# base64 a bytes field cannot hold; invalid UTF-8 and an escaped lone surrogate in a string.
HUGE_NUMBERS = [b"1e999999", b"-1e999999", b"9" * 5000, b"1E+400", b"1e-99999", b"-0"]
HUGE_NUMBERS += [b"18446744073709551616", b"-9223372036854775809", b"1.5", b"1e2", b"0x10"]
HUGE_NUMBERS += [b"+1", b"01", b".5", b'"1e3"', b'"9223372036854775808"', b'" 1"', b'"-"']
BAD_BASE64 = ["!!!!", "a", "ab=", "abc", "====", "a===", "YQ", "YQ=", "Y Q =", "_-_-", "+/+/"]
BAD_BASE64 += ["YQ==\n", "YQ==YQ==", "\u00e9", "\x00"]
BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
BAD_UTF8 += [b"\\ud800", b"\\udfff\\ud800", b"\\u0000"]
ODD_KEYS = ["someFutureField", "@type", "__proto__", "", "run_id", "runId", "x" * 300]
_RAW = "@@keel-raw-{}@@"  # a value json_mutants writes as JSON text of its own


def json_mutants(document: Any) -> st.SearchStrategy[bytes]:
    """`document` (a message's JSON, json_format.MessageToDict's) as JSON text with one to
    three changes: a value (at any depth, or the whole) of the wrong type, null, a number
    past any type, nested past parsers' limits, base64 no decoder takes, a string with
    invalid UTF-8 or an escaped lone surrogate, any text json_texts makes; an unknown field
    added; then, now and then, the text cut, doubled, after a byte order mark or before
    garbage."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        raws: list[bytes] = []

        def raw(text: bytes) -> str:
            raws.append(text)
            return _RAW.format(len(raws) - 1)

        values: list[st.SearchStrategy[Any]] = [
            weighted((2, st.sampled_from(EDGE_JSON)), (1, json_values(4))),  # the wrong type
            st.none(),
            st.sampled_from(HUGE_NUMBERS).map(raw),
            deep_json().map(lambda text: raw(text.encode())),
            st.sampled_from(BAD_BASE64),
            st.builds(
                lambda bad, text: raw(b'"' + text.encode()[:8] + bad + b'"'),
                st.sampled_from(BAD_UTF8),
                st.text(st.characters(codec="ascii", categories=["L"]), max_size=8),
            ),
            json_texts().map(lambda text: raw(text.encode())),
        ]
        copy = json.loads(json.dumps(document))
        for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
            spots = _spots(copy)
            parent, key = draw(st.sampled_from(spots))
            if draw(st.integers(0, len(values))) == len(values):  # an unknown field
                target = copy if parent is None else parent[key]
                if not isinstance(target, dict):
                    target = copy if isinstance(copy, dict) else {}
                target[draw(st.one_of(st.sampled_from(ODD_KEYS), st.text(max_size=10)))] = draw(
                    json_values(4)
                )
                continue
            new = draw(draw(st.sampled_from(values)))
            if parent is None:
                copy = new
            else:
                parent[key] = new
        text = json.dumps(copy, ensure_ascii=draw(st.booleans())).encode()
        for n, fragment in enumerate(raws):
            text = text.replace(json.dumps(_RAW.format(n)).encode(), fragment)
        edit = draw(st.integers(0, 9))
        if edit == 0:
            return text[: draw(st.integers(0, max(0, len(text) - 1)))]
        if edit == 1:
            return text + draw(st.sampled_from([text, b"x", b"\x00", b",", b"}"]))
        if edit == 2:
            return b"\xef\xbb\xbf" + text
        return text

    return mutate()


def _spots(document: Any) -> list[tuple[Any, Any]]:
    """Every place in a JSON value: (container, key or index), and (None, None) for the whole."""
    found: list[tuple[Any, Any]] = [(None, None)]
    stack = [document]
    while stack:
        node = stack.pop()
        keys = (
            list(node)
            if isinstance(node, dict)
            else range(len(node))
            if isinstance(node, list)
            else []
        )
        for key in keys:
            found.append((node, key))
            stack.append(node[key])
    return found


class Messages:
    """Messages of any type, built from descriptors; see the module's docstring.

    Half of them are wild (any field may hold anything) and half plausible: fields with
    a hint hold a hinted value, the others short ASCII, small numbers, defined enum
    numbers, valid timestamps; so a request also gets past its first check now and then.
    `mutants` changes a few fields of messages that worked (a corpus).
    """

    def __init__(
        self, hints: Hints | None = None, *, max_depth: int = 3, max_repeated: int = 4
    ) -> None:
        self._hints = dict(hints or {})
        self._max_depth = max_depth
        self._max_repeated = max_repeated
        self._cache: dict[tuple[str, int, bool], st.SearchStrategy[Message]] = {}

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        """Messages of `descriptor`'s type, wild and plausible."""
        return weighted(
            (1, self._message(descriptor, depth, plausible=False)),
            (1, self._message(descriptor, depth, plausible=True)),
        )

    def mutants(
        self, descriptor: Descriptor, corpus: Sequence[bytes]
    ) -> st.SearchStrategy[Message]:
        """Messages of a corpus (encodings of messages that worked) with one to three fields,
        at any depth, cleared, set to a wild or plausible value, or (strings) perturbed: the
        rest of such a message is valid, so the changed fields are what the server meets.
        A field the message has is changed twice as often as any field."""
        make = GetMessageClass(descriptor)
        if not corpus or not descriptor.fields:
            return self._message(descriptor, 0, plausible=True)

        @st.composite
        def mutate(draw: st.DrawFn, encoded: bytes) -> Message:
            message = make.FromString(encoded)
            for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
                self._mutate(draw, message, descriptor, 0)
            return message

        return st.sampled_from(list(corpus)).flatmap(mutate)

    def _mutate(
        self, draw: st.DrawFn, message: Message, descriptor: Descriptor, depth: int
    ) -> None:
        """Change one field of `message`, or of a message in it."""
        present = [field for field, _ in message.ListFields()]
        fields = list(descriptor.fields)
        pick_present = present and draw(st.integers(0, 2)) > 0
        field = draw(st.sampled_from(present if pick_present else fields))
        nested = (
            field.type == F.TYPE_MESSAGE
            and not field.is_repeated
            and field.message_type.fields
            and depth < self._max_depth
        )
        if nested and draw(st.booleans()):
            self._mutate(draw, getattr(message, field.name), field.message_type, depth + 1)
            return
        how = draw(st.integers(0, 5))
        if how >= 3 and field.type == F.TYPE_STRING and not field.is_repeated:
            setattr(message, field.name, draw(perturbed(getattr(message, field.name))))
            return
        message.ClearField(field.name)
        if how:  # or leave it cleared
            plausible = draw(st.booleans())
            _set(message, field, draw(self._value(descriptor, field, depth, plausible)))

    def _message(
        self, descriptor: Descriptor, depth: int, *, plausible: bool
    ) -> st.SearchStrategy[Message]:
        key = (descriptor.full_name, depth, plausible)
        if key not in self._cache:
            self._cache[key] = st.deferred(lambda: self._build(descriptor, depth, plausible))
        return self._cache[key]

    def _build(
        self, descriptor: Descriptor, depth: int, plausible: bool
    ) -> st.SearchStrategy[Message]:
        make = GetMessageClass(descriptor)
        if depth > self._max_depth:
            return st.builds(make)
        special = WELL_KNOWN.get(descriptor.full_name)
        if special is not None:
            if plausible:
                return special(descriptor, True)
            return weighted(
                (1, self._fields_of(descriptor, depth, plausible)), (2, special(descriptor, False))
            )
        return self._fields_of(descriptor, depth, plausible)

    def _fields_of(
        self, descriptor: Descriptor, depth: int, plausible: bool
    ) -> st.SearchStrategy[Message]:
        make = GetMessageClass(descriptor)
        plain: list[tuple[FieldDescriptor, st.SearchStrategy[Any]]] = []
        oneofs: list[list[tuple[FieldDescriptor, st.SearchStrategy[Any]]]] = []
        for oneof in descriptor.oneofs:
            if not _synthetic(oneof):
                oneofs.append(
                    [(f, self._value(descriptor, f, depth, plausible)) for f in oneof.fields]
                )
        for field in descriptor.fields:
            if field.containing_oneof is None or _synthetic(field.containing_oneof):
                plain.append((field, self._value(descriptor, field, depth, plausible)))

        # A plausible message has most of its fields (the required ones among them).
        present = st.integers(0, 7).map(bool) if plausible else st.booleans()

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = make()
            for field, values in plain:
                if draw(present):
                    _set(message, field, draw(values))
            for members in oneofs:
                chosen = draw(st.integers(-1, len(members) - 1))
                if chosen >= 0:
                    field, values = members[chosen]
                    _set(message, field, draw(values))
            return message

        return build()

    def _value(
        self, owner: Descriptor, field: FieldDescriptor, depth: int, plausible: bool
    ) -> st.SearchStrategy[Any]:
        longest = 3 if plausible else self._max_repeated
        if _is_map(field):
            entry = field.message_type
            keys = self._single(owner, entry.fields_by_name["key"], depth, plausible, field)
            values = self._single(owner, entry.fields_by_name["value"], depth, plausible, field)
            small = st.dictionaries(keys, values, max_size=longest)
            if plausible:
                return small
            return weighted(
                (4, small), (1, st.dictionaries(keys, values, min_size=60, max_size=70))
            )
        single = self._single(owner, field, depth, plausible)
        if not field.is_repeated:
            return single
        if plausible:
            return st.lists(single, min_size=1, max_size=longest)
        return weighted(
            (5, st.lists(single, max_size=longest)),
            (1, st.lists(single, min_size=20, max_size=40)),
        )

    def _single(
        self,
        owner: Descriptor,
        field: FieldDescriptor,
        depth: int,
        plausible: bool,
        map_field: FieldDescriptor | None = None,
    ) -> st.SearchStrategy[Any]:
        """Values of one field (or of a map's keys or values: `map_field` is the map)."""
        generic = self._generic(owner, field, depth, plausible)
        hint = self._hints.get((map_field or field).full_name)
        if hint is None and map_field is None:
            hint = self._hints.get(field.name)
        if hint is None:
            return generic
        return hint if plausible else weighted((1, generic), (2, hint))

    def _generic(
        self, owner: Descriptor, field: FieldDescriptor, depth: int, plausible: bool
    ) -> st.SearchStrategy[Any]:
        kind = field.type
        if kind == F.TYPE_MESSAGE:
            nested = (
                self._message(field.message_type, depth + 1, plausible=True)
                if plausible
                else self.message(field.message_type, depth + 1)
            )
            if field.message_type.full_name == "google.protobuf.FieldMask":
                masks = field_masks(owner, plausible)
                return masks if plausible else weighted((1, nested), (3, masks))
            return nested
        if plausible:
            return _plausible(field)
        if kind == F.TYPE_STRING:
            return strings()
        if kind == F.TYPE_BYTES:
            return byte_strings()
        if kind == F.TYPE_BOOL:
            return st.booleans()
        if kind == F.TYPE_ENUM:
            return enum_numbers(field.enum_type)
        if kind == F.TYPE_DOUBLE:
            return floats(64)
        if kind == F.TYPE_FLOAT:
            return floats(32)
        if kind in INT_RANGES:
            return integers(*INT_RANGES[kind])
        raise NotImplementedError(f"{field.full_name}: field type {kind}")


def _plausible(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """A value of a scalar field such as a well-behaved client would send."""
    kind = field.type
    if kind == F.TYPE_STRING:
        return st.text(st.characters(codec="ascii", categories=["L", "Nd"]), max_size=12)
    if kind == F.TYPE_BYTES:
        return st.binary(max_size=8)
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(0, 1)
    if kind in INT_RANGES:
        return st.integers(0, 10)
    raise NotImplementedError(f"{field.full_name}: field type {kind}")


def _synthetic(oneof: Any) -> bool:
    """A proto3 `optional` field's oneof of its own, not a oneof of the schema."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == F.TYPE_MESSAGE
        and field.is_repeated
        and field.message_type.GetOptions().map_entry
    )


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    name = field.name
    if _is_map(field):
        target = getattr(message, name)
        if field.message_type.fields_by_name["value"].type == F.TYPE_MESSAGE:
            for key, item in value.items():
                target[key].CopyFrom(item)
        else:
            target.update(value)
    elif field.is_repeated:
        if field.type == F.TYPE_MESSAGE:
            for item in value:
                getattr(message, name).add().CopyFrom(item)
        else:
            getattr(message, name).extend(value)
    elif field.type == F.TYPE_MESSAGE:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


# -- well-known types ----------------------------------------------------------------


def _seconds_and_nanos(
    descriptor: Descriptor, max_seconds: int, plausible: bool
) -> st.SearchStrategy[Message]:
    make = GetMessageClass(descriptor)
    nanos = st.integers(0, 999_999_999)
    if plausible:
        return st.builds(lambda s, n: make(seconds=s, nanos=n), st.integers(0, 10**6), nanos)
    return st.builds(
        lambda seconds, nanos: make(seconds=seconds, nanos=nanos),
        weighted(
            (3, st.integers(-max_seconds, max_seconds)),
            (1, st.sampled_from([0, 1, -1, max_seconds + 1, 2**63 - 1, -(2**63)])),
        ),
        weighted((3, nanos), (1, st.sampled_from([-1, 10**9, -(10**9), 2**31 - 1, -(2**31)]))),
    )


WELL_KNOWN: dict[str, Callable[[Descriptor, bool], st.SearchStrategy[Message]]] = {
    # Valid seconds reach 9999-12-31 (Timestamp) or 10,000 years (Duration).
    "google.protobuf.Timestamp": lambda d, plausible: _seconds_and_nanos(
        d, 253_402_300_799, plausible
    ),
    "google.protobuf.Duration": lambda d, plausible: _seconds_and_nanos(
        d, 315_576_000_000, plausible
    ),
}


def field_paths(owner: Descriptor) -> tuple[list[str], list[str]]:
    """What a FieldMask in `owner` may name: the fields of `owner`'s other messages (as an
    update mask does), and every dotted path into `owner`'s fields, three deep."""

    def paths(descriptor: Descriptor, depth: int) -> list[str]:
        found: list[str] = []
        for field in descriptor.fields:
            found.append(field.name)
            if field.type == F.TYPE_MESSAGE and not field.is_repeated and depth > 1:
                found += [f"{field.name}.{p}" for p in paths(field.message_type, depth - 1)]
        return found

    siblings = [
        field.name
        for message in owner.fields
        if message.type == F.TYPE_MESSAGE
        and not message.is_repeated
        and not message.message_type.full_name.startswith("google.protobuf.")
        for field in message.message_type.fields
    ]
    return siblings, paths(owner, 3)


def field_masks(owner: Descriptor, plausible: bool = False) -> st.SearchStrategy[Message]:
    """FieldMasks naming fields of the messages beside them (what an update mask names);
    unless plausible, also any path into the request, odd separators and random text."""
    from google.protobuf.field_mask_pb2 import FieldMask

    siblings, dotted = field_paths(owner)
    if plausible:
        return st.lists(st.sampled_from(siblings or dotted), min_size=1, max_size=3).map(
            lambda p: FieldMask(paths=p)
        )
    paths = weighted(
        (4, st.sampled_from(siblings or dotted)),
        (2, st.sampled_from(dotted)),
        (1, st.sampled_from(["", "*", ".", "a..b", "Cron", "cron ", "nope", "a.b.c.d"])),
        (1, strings(oversized=False)),
    )
    return st.lists(paths, max_size=6).map(lambda p: FieldMask(paths=p))


# -- bodies that are not messages ------------------------------------------------------


def varint(value: int) -> bytes:
    """The protobuf base-128 varint of a non-negative `value` (any size)."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _wire_field(numbers: Sequence[int]) -> st.SearchStrategy[bytes]:
    """One field on the wire: a known or unknown number, any wire type (6 and 7 do not
    exist), and a payload that may not fit its type."""
    number = weighted(
        (3, st.sampled_from(list(numbers) or [1])),
        (1, st.sampled_from([0, 19000, 19999, 2**29 - 1, 2**29, 2**32])),
        (1, st.integers(1, 2**29 - 1)),
    )
    varints = st.one_of(
        st.integers(0, 2**64 - 1).map(varint),
        st.just(b"\xff" * 10 + b"\x01"),  # overlong: 11 bytes
        st.just(b"\x80"),  # unterminated
    )
    lengths = st.one_of(
        st.binary(max_size=32).map(lambda data: varint(len(data)) + data),
        st.sampled_from(
            [b"\x02\xff\xfe", b"\x03\xed\xa0\x80", b"\x01\xc0", b"\x7f"]
        ),  # bad UTF-8, short
        st.just(varint(2**31) + b"x"),  # a length past the end
    )
    return st.one_of(
        st.builds(lambda n, v: _tag(n, 0) + v, number, varints),
        st.builds(lambda n, p: _tag(n, 1) + p, number, st.binary(min_size=0, max_size=8)),
        st.builds(lambda n, p: _tag(n, 2) + p, number, lengths),
        st.builds(lambda n: _tag(n, 3), number),  # a group that never ends
        st.builds(lambda n: _tag(n, 4), number),  # the end of a group never started
        st.builds(lambda n, p: _tag(n, 5) + p, number, st.binary(min_size=0, max_size=4)),
        st.builds(lambda n, w: _tag(n, w), number, st.sampled_from([6, 7])),
    )


def _nested_groups(depth: int) -> bytes:
    """Unknown field 15, as groups nested `depth` deep."""
    return _tag(15, 3) * depth + _tag(15, 4) * depth


def _nested_messages(number: int, depth: int) -> bytes:
    """Field `number` as a length-delimited field holding itself, `depth` deep."""
    body = b""
    for _ in range(depth):
        body = _tag(number, 2) + varint(len(body)) + body
    return body


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """`data` with some edits: (kind, where, byte) replaces, inserts, deletes or truncates."""
    buffer = bytearray(data)
    for kind, where, value in edits:
        at = where % (len(buffer) + 1)
        if kind == 0 and at < len(buffer):
            buffer[at] = value
        elif kind == 1:
            buffer.insert(at, value)
        elif kind == 2 and at < len(buffer):
            del buffer[at]
        elif kind == 3:
            del buffer[at:]
    return bytes(buffer)


def raw_bodies(
    descriptor: Descriptor, messages: st.SearchStrategy[Message]
) -> st.SearchStrategy[bytes]:
    """Request bodies for a method taking `descriptor`: mostly not valid encodings of it."""
    numbers = [f.number for f in descriptor.fields]
    edits = st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
    return weighted(
        (3, st.binary(max_size=256)),
        (3, st.lists(_wire_field(numbers), min_size=1, max_size=6).map(b"".join)),
        (3, st.builds(lambda m, e: _mutate(m.SerializeToString(), e), messages, edits)),
        (
            1,
            st.builds(
                lambda m, junk: m.SerializeToString() + junk,
                messages,
                st.lists(_wire_field(numbers), min_size=1, max_size=3).map(b"".join),
            ),
        ),
        (1, st.sampled_from([10, 100, 10_000]).map(_nested_groups)),
        (
            1,
            st.builds(
                _nested_messages,
                st.sampled_from(numbers or [1]),
                st.sampled_from([2, 100, 1000]),
            ),
        ),
        (1, st.sampled_from([b"", b"\x00", b"\x00" * 1000, b"\xff" * 100_000])),
    )
