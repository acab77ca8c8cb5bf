from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from tests.framing.chunking import assert_split_invariant, chunkings, decode_split, decode_whole

from oisp.framing import FramingError, FramingErrorKind, NdjsonDecoder, NdjsonValue


def decode(data: bytes, **kwargs: Any) -> list[Any]:
    decoder = NdjsonDecoder(**kwargs)
    return decoder.feed(data) + decoder.close()


def test_each_line_is_one_json_value_with_its_line_number() -> None:
    stream = b'{"a": 1}\n[1, 2]\n"s"\n3.5\ntrue\nnull\n'
    assert decode(stream) == [
        NdjsonValue({"a": 1}, 1),
        NdjsonValue([1, 2], 2),
        NdjsonValue("s", 3),
        NdjsonValue(3.5, 4),
        NdjsonValue(True, 5),
        NdjsonValue(None, 6),
    ]


def test_blank_lines_are_skipped_but_counted() -> None:
    assert decode(b"\n  \n1\n\t\r\n2\n") == [NdjsonValue(1, 3), NdjsonValue(2, 5)]


def test_crlf_line_ends_are_tolerated() -> None:
    assert decode(b'{"a":1}\r\n{"b":2}\r\n') == [NdjsonValue({"a": 1}, 1), NdjsonValue({"b": 2}, 2)]


def test_value_is_returned_as_soon_as_its_newline_arrives() -> None:
    decoder = NdjsonDecoder()
    assert decoder.feed(b'{"model":"llama3","done":fal') == []
    assert decoder.feed(b"se}\n{") == [NdjsonValue({"model": "llama3", "done": False}, 1)]


def test_last_line_without_newline_is_parsed_at_close() -> None:
    decoder = NdjsonDecoder()
    assert decoder.feed(b'1\n{"done": true}') == [NdjsonValue(1, 1)]
    assert decoder.close() == [NdjsonValue({"done": True}, 2)]


def test_invalid_line_is_an_error_item_and_decoding_goes_on() -> None:
    items = decode(b'{"ok": 1}\n{"broken": \nnot json\n{"ok": 2}\n')
    assert items[0] == NdjsonValue({"ok": 1}, 1)
    assert items[3] == NdjsonValue({"ok": 2}, 4)
    for item, line, offset in ((items[1], 2, 10), (items[2], 3, 22)):
        assert isinstance(item, FramingError)
        assert item.kind is FramingErrorKind.MALFORMED
        assert item.line == line
        assert item.offset == offset
        assert item.reason.startswith("invalid JSON: ")
        assert not item.fatal
    assert items[2].raw == b"not json"
    assert items[2].message == "ndjson line 3: invalid JSON: Expecting value (column 1)"


def test_two_values_on_one_line_are_an_error() -> None:
    [error] = decode(b"1 2\n")
    assert isinstance(error, FramingError)
    assert "Extra data" in error.reason


def test_truncated_last_line_is_an_error_at_close() -> None:
    [value, error] = decode(b'{"a": 1}\n{"a": ')
    assert value == NdjsonValue({"a": 1}, 1)
    assert isinstance(error, FramingError)
    assert error.line == 2
    assert error.kind is FramingErrorKind.MALFORMED


def test_bom_at_stream_start_is_ignored() -> None:
    assert assert_split_invariant(NdjsonDecoder, b"\xef\xbb\xbf1\n2\n") == [NdjsonValue(1, 1), NdjsonValue(2, 2)]
    assert decode(b"\xef\xbb\xbf\n1\n") == [NdjsonValue(1, 2)]


def test_invalid_utf8_is_replaced() -> None:
    assert decode(b'"a\xffb"\n') == [NdjsonValue("a\ufffdb", 1)]


def test_multibyte_characters_split_anywhere_decode_the_same() -> None:
    stream = '{"message": {"content": "\u00e9\u4e16 \U0001f600"}}\n'.encode()
    assert assert_split_invariant(NdjsonDecoder, stream) == [
        NdjsonValue({"message": {"content": "\u00e9\u4e16 \U0001f600"}}, 1)
    ]


def test_too_deep_nesting_is_an_error_not_a_crash() -> None:
    [error, value] = decode(b"[" * 100_000 + b"]" * 100_000 + b"\n1\n")
    assert isinstance(error, FramingError)
    assert error.kind is FramingErrorKind.MALFORMED
    assert value == NdjsonValue(1, 2)


def test_oversized_line_is_skipped_and_decoding_resumes_at_the_next_line() -> None:
    stream = b"1\n" + b'"' + b"x" * 200 + b'"\n' + b"3\n"
    items = assert_split_invariant(lambda: NdjsonDecoder(max_item_size=100), stream)
    assert items[0] == NdjsonValue(1, 1)
    assert isinstance(items[1], FramingError)
    assert items[1].kind is FramingErrorKind.OVERSIZED
    assert (items[1].line, items[1].offset) == (2, 2)
    assert items[2] == NdjsonValue(3, 3)


def test_oversized_line_is_not_buffered() -> None:
    decoder = NdjsonDecoder(max_item_size=1000)
    items = []
    for _ in range(100):
        items += decoder.feed(b"9" * 999)
    assert len(decoder._partial) <= 1000
    assert [item.kind for item in items] == [FramingErrorKind.OVERSIZED]  # type: ignore[union-attr]
    assert decoder.feed(b"\n7\n") == [NdjsonValue(7, 2)]


def test_oversized_last_line_is_not_parsed_at_close() -> None:
    items = decode(b"1\n" + b"2" * 50, max_item_size=10)
    assert items[0] == NdjsonValue(1, 1)
    assert [type(item) for item in items] == [NdjsonValue, FramingError]


# Property tests --------------------------------------------------------------------------------------------

_json_text = st.text(st.characters(codec="utf-8"), max_size=6) | st.sampled_from(["\U0001f600", "\u00e9", "\\"])
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _json_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_json_text, children, max_size=3),
    max_leaves=8,
)


@st.composite
def ndjson_streams(draw: st.DrawFn) -> tuple[bytes, list[NdjsonValue]]:
    values = draw(st.lists(json_values, max_size=5))
    lines: list[str] = []
    expected: list[NdjsonValue] = []
    for value in values:
        lines += draw(st.lists(st.sampled_from(["", " ", "\r"]), max_size=2))
        lines.append(json.dumps(value, ensure_ascii=False) + draw(st.sampled_from(["", "\r", " "])))
        expected.append(NdjsonValue(value, len(lines)))
    text = "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))
    return text.encode(), expected


@given(ndjson_streams(), st.data())
def test_any_chunking_of_a_valid_stream_gives_the_expected_values(
    stream: tuple[bytes, list[NdjsonValue]], data: st.DataObject
) -> None:
    raw, expected = stream
    assert decode_whole(NdjsonDecoder, raw) == expected
    assert decode_split(NdjsonDecoder, raw, data.draw(chunkings(raw))) == expected


_noisy_bytes = st.lists(
    st.sampled_from(
        [
            b"1",
            b'"\xf0\x9f\x98\x80"',
            b"{",
            b"}",
            b"\n",
            b"\r\n",
            b" ",
            b"\xff",
            b"\xef\xbb\xbf",
            b'{"a": [1, 2]}',
            b"x" * 12,
        ]
    ),
    max_size=40,
).map(b"".join)


@given(_noisy_bytes, st.data())
def test_any_chunking_of_any_bytes_gives_the_same_items(raw: bytes, data: st.DataObject) -> None:
    def make() -> NdjsonDecoder:
        return NdjsonDecoder(max_item_size=16)

    assert decode_split(make, raw, data.draw(chunkings(raw))) == decode_whole(make, raw)
