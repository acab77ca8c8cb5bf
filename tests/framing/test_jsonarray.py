from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from tests.framing.chunking import assert_split_invariant, chunkings, decode_split, decode_whole
from tests.framing.test_ndjson import json_values

from oisp.framing import FramingError, FramingErrorKind, JsonArrayDecoder, JsonArrayElement


def decode(data: bytes, **kwargs: Any) -> list[Any]:
    decoder = JsonArrayDecoder(**kwargs)
    return decoder.feed(data) + decoder.close()


def errors(items: list[Any]) -> list[FramingError]:
    return [item for item in items if isinstance(item, FramingError)]


def values(items: list[Any]) -> list[Any]:
    return [item.value for item in items if isinstance(item, JsonArrayElement)]


GEMINI = (
    b'[{"candidates": [{"content": {"parts": [{"text": "Bonjour"}],"role": "model"}}],'
    b'"modelVersion": "gemini-2.0-flash"}\n,\r\n'
    b'{"candidates": [{"content": {"parts": [{"text": " \xe2\x80\x94 \xf0\x9f\x91\x8b {]\\"\\\\"}],"role": "model"},'
    b'"finishReason": "STOP"}],"usageMetadata": {"promptTokenCount": 3}}\n]'
)


def test_gemini_style_array_gives_each_element() -> None:
    items = assert_split_invariant(JsonArrayDecoder, GEMINI)
    assert [item.index for item in items] == [0, 1]
    assert items[1].value["candidates"][0]["content"]["parts"][0]["text"] == ' \u2014 \U0001f44b {]"\\'


def test_element_is_returned_as_soon_as_it_is_complete() -> None:
    decoder = JsonArrayDecoder()
    assert decoder.feed(b'[{"a": "}') == []
    assert decoder.feed(b'"}') == [JsonArrayElement({"a": "}"}, 0)]
    assert decoder.feed(b"\n,\r\n[1, [2") == []
    assert decoder.feed(b"]]") == [JsonArrayElement([1, [2]], 1)]
    assert decoder.feed(b"]") == []
    assert decoder.close() == []


def test_scalar_elements_end_at_a_comma_bracket_or_whitespace() -> None:
    assert values(decode(b'[1, -2.5e3 ,"s,]\\"",true,false ,null]')) == [1, -2500.0, 's,]"', True, False, None]


def test_number_is_not_returned_before_its_end_is_known() -> None:
    decoder = JsonArrayDecoder()
    assert decoder.feed(b"[12") == []
    assert decoder.feed(b"34]") == [JsonArrayElement(1234, 0)]


def test_empty_array_and_surrounding_whitespace() -> None:
    assert decode(b" \r\n[ \n ] \n") == []
    assert decode(b"\xef\xbb\xbf[1]") == [JsonArrayElement(1, 0)]


def test_backslashes_before_quotes_are_followed() -> None:
    stream = b'["\\\\", "\\\\\\"]", {"k": "\\\\"}]'
    assert values(assert_split_invariant(JsonArrayDecoder, stream)) == ["\\", '\\"]', {"k": "\\"}]


def test_invalid_element_is_an_error_item_and_decoding_goes_on() -> None:
    items = decode(b'[{"a": 1}, {"a": tru}, {"a": 3}]')
    assert values(items) == [{"a": 1}, {"a": 3}]
    [error] = errors(items)
    assert error.kind is FramingErrorKind.MALFORMED
    assert error.offset == 11
    assert error.raw == b'{"a": tru}'
    assert error.reason.startswith("element 1 is not valid JSON")
    assert [item.index for item in items if isinstance(item, JsonArrayElement)] == [0, 2]


def test_garbage_between_elements_is_skipped_to_the_next_comma() -> None:
    items = assert_split_invariant(JsonArrayDecoder, b'[{"a": 1} garbage! , {"a": 2}\n junk ]')
    assert values(items) == [{"a": 1}, {"a": 2}]
    garbage = errors(items)
    assert [error.raw for error in garbage] == [b"garbage! ", b"junk "]
    assert all(error.kind is FramingErrorKind.MALFORMED and not error.fatal for error in garbage)


def test_garbage_in_place_of_an_element_is_an_invalid_element() -> None:
    items = decode(b"[1, nope, 3]")
    assert values(items) == [1, 3]
    assert errors(items)[0].raw == b"nope"


def test_empty_element_and_trailing_comma_are_reported() -> None:
    items = decode(b"[1,,2,]")
    assert values(items) == [1, 2]
    assert [error.reason for error in errors(items)] == [
        "empty element (two ',' in a row)",
        "trailing ',' before the closing ']'",
    ]


def test_stream_that_is_not_an_array_stops_the_decoder() -> None:
    decoder = JsonArrayDecoder()
    [error] = decoder.feed(b'{"error": {"code": 429}}')
    assert error.fatal  # type: ignore[union-attr]
    assert error.reason == "expected a JSON array, found b'{'"  # type: ignore[union-attr]
    assert decoder.feed(b"[1]") == []
    assert decoder.close() == []


def test_data_after_the_closing_bracket_stops_the_decoder() -> None:
    items = decode(b"[1]\n[2]")
    assert items[0] == JsonArrayElement(1, 0)
    assert isinstance(items[1], FramingError)
    assert items[1].fatal
    assert items[1].offset == 4
    assert len(items) == 2


def test_stream_ending_inside_an_element_is_incomplete() -> None:
    [first, error] = decode(b'[{"a": 1},\n{"a": "unfinished')
    assert first == JsonArrayElement({"a": 1}, 0)
    assert isinstance(error, FramingError)
    assert error.kind is FramingErrorKind.INCOMPLETE
    assert error.raw == b'{"a": "unfinished'
    assert error.offset == 11


def test_stream_ending_before_the_closing_bracket_is_incomplete() -> None:
    [first, error] = decode(b"[1,")
    assert first == JsonArrayElement(1, 0)
    assert isinstance(error, FramingError)
    assert error.kind is FramingErrorKind.INCOMPLETE
    assert error.reason == "stream ended before the closing ']'"


def test_empty_stream_is_incomplete() -> None:
    [error] = decode(b"")
    assert isinstance(error, FramingError)
    assert error.kind is FramingErrorKind.INCOMPLETE


def test_oversized_element_is_scanned_past_and_decoding_goes_on() -> None:
    big = b'{"text": "' + b'[{\\"' * 100 + b'"}'
    stream = b"[1, " + big + b", 3]"
    items = assert_split_invariant(lambda: JsonArrayDecoder(max_item_size=64), stream)
    assert items[0] == JsonArrayElement(1, 0)
    assert isinstance(items[1], FramingError)
    assert items[1].kind is FramingErrorKind.OVERSIZED
    assert items[1].offset == 4
    assert items[2] == JsonArrayElement(3, 2)


def test_oversized_element_is_not_buffered() -> None:
    decoder = JsonArrayDecoder(max_item_size=1000)
    items = decoder.feed(b'[{"k": [')
    for _ in range(100):
        items += decoder.feed(b'"abc", {"x": "]"}, ' * 50)
        assert len(decoder._buf) < 2000
    items += decoder.feed(b"1]}, 2]")
    assert [type(item) for item in items] == [FramingError, JsonArrayElement]
    assert items[1] == JsonArrayElement(2, 1)
    assert decoder.close() == []


def test_too_deep_nesting_is_an_error_not_a_crash() -> None:
    items = decode(b"[" + b"[" * 100_000 + b"]" * 100_000 + b", 1]")
    assert isinstance(items[0], FramingError)
    assert items[1] == JsonArrayElement(1, 1)


# Property tests --------------------------------------------------------------------------------------------


@st.composite
def json_array_streams(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    elements = draw(st.lists(json_values, max_size=6))
    space = st.sampled_from(["", " ", "\n", "\r\n", "\t"])
    parts = [draw(space), "["]
    for index, element in enumerate(elements):
        if index:
            parts += [draw(space), ",", draw(space)]
        else:
            parts.append(draw(space))
        parts.append(json.dumps(element, ensure_ascii=draw(st.booleans())))
    parts += [draw(space), "]", draw(space)]
    return "".join(parts).encode(), elements


@given(json_array_streams(), st.data())
def test_any_chunking_of_a_valid_stream_gives_the_expected_elements(
    stream: tuple[bytes, list[Any]], data: st.DataObject
) -> None:
    raw, expected = stream
    expected_items = [JsonArrayElement(value, index) for index, value in enumerate(expected)]
    assert decode_whole(JsonArrayDecoder, raw) == expected_items
    assert decode_split(JsonArrayDecoder, raw, data.draw(chunkings(raw))) == expected_items


_noisy_bytes = st.lists(
    st.sampled_from(
        [
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b'"',
            b"\\",
            b" ",
            b"\n",
            b"1",
            b"tru",
            b'"\xf0\x9f\x98\x80"',
            b'{"a": [1, "]"]}',
            b"x" * 12,
            b"\xef\xbb\xbf",
        ]
    ),
    max_size=40,
).map(b"".join)
_openings = st.sampled_from([b"[", b" \r\n[", b"\xef\xbb\xbf[", b"", b"\xef\xbb"])


@given(_openings, _noisy_bytes, st.data())
def test_any_chunking_of_any_bytes_gives_the_same_items(opening: bytes, rest: bytes, data: st.DataObject) -> None:
    raw = opening + rest

    def make() -> JsonArrayDecoder:
        return JsonArrayDecoder(max_item_size=16)

    assert decode_split(make, raw, data.draw(chunkings(raw))) == decode_whole(make, raw)
