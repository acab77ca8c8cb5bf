from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from tests.framing.chunking import assert_split_invariant, chunkings, decode_split, decode_whole

from oisp.framing import FramingError, FramingErrorKind, SseComment, SseDecoder, SseEvent


def decode(data: bytes, **kwargs: Any) -> list[Any]:
    decoder = SseDecoder(**kwargs)
    return decoder.feed(data) + decoder.close()


def test_blank_line_dispatches_an_event_with_the_default_type() -> None:
    assert decode(b"data: hello\n\n") == [SseEvent(data="hello")]


def test_data_lines_are_joined_with_newlines() -> None:
    assert decode(b"data: a\ndata: b\ndata:\ndata: c\n\n") == [SseEvent(data="a\nb\n\nc")]


def test_event_field_sets_the_type_and_is_reset_after_dispatch() -> None:
    stream = b"event: delta\ndata: 1\n\ndata: 2\n\n"
    assert decode(stream) == [SseEvent(event="delta", data="1"), SseEvent(data="2")]


def test_empty_event_field_means_message() -> None:
    assert decode(b"event:\ndata: x\n\n") == [SseEvent(data="x")]


def test_crlf_cr_and_lf_all_end_lines() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\nevent: e\rdata: d\r\r"
    assert decode(stream) == [SseEvent(data="a\nb\nc"), SseEvent(event="e", data="d")]


def test_cr_ending_a_chunk_and_lf_starting_the_next_are_one_line_end() -> None:
    decoder = SseDecoder()
    items = decoder.feed(b"data: a\r")
    items += decoder.feed(b"\ndata: b\r")
    items += decoder.feed(b"\n\r")
    items += decoder.feed(b"\n")
    assert items + decoder.close() == [SseEvent(data="a\nb")]


def test_cr_then_cr_in_the_next_chunk_is_a_blank_line() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [SseEvent(data="a")]


def test_comment_lines_are_skipped() -> None:
    stream = b": OPENROUTER PROCESSING\n\n:\ndata: {}\n: mid-event comment\n\n"
    assert decode(stream) == [SseEvent(data="{}")]


def test_comment_lines_are_returned_when_asked_for() -> None:
    stream = b": OPENROUTER PROCESSING\n\n:no-space\n:\ndata: x\n\n"
    assert decode(stream, comments=True) == [
        SseComment("OPENROUTER PROCESSING"),
        SseComment("no-space"),
        SseComment(""),
        SseEvent(data="x"),
    ]


def test_field_without_colon_has_an_empty_value() -> None:
    assert decode(b"data\ndata\n\n") == [SseEvent(data="\n")]


def test_only_one_space_after_the_colon_is_stripped() -> None:
    assert decode(b"data:  two spaces\ndata:none\ndata: a: b\n\n") == [SseEvent(data=" two spaces\nnone\na: b")]


def test_unknown_fields_and_wrong_case_field_names_are_ignored() -> None:
    assert decode(b"Data: no\nfoo: bar\ndata: yes\n\n") == [SseEvent(data="yes")]


def test_event_with_no_data_field_is_not_dispatched() -> None:
    assert decode(b"event: ping\n\nid: 1\n\ndata: x\n\n") == [SseEvent(data="x", id="1")]


def test_last_event_id_carries_over_to_later_events() -> None:
    stream = b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"
    assert decode(stream) == [SseEvent(data="a", id="1"), SseEvent(data="b", id="1"), SseEvent(data="c", id="")]


def test_id_containing_nul_is_ignored() -> None:
    assert decode(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n") == [
        SseEvent(data="a", id="1"),
        SseEvent(data="b", id="1"),
    ]


def test_retry_must_be_ascii_digits() -> None:
    decoder = SseDecoder()
    items = decoder.feed(
        b"retry: 3000\ndata: a\n\nretry: 12a\ndata: b\n\nretry: \xc2\xb2\ndata: c\n\nretry:\ndata: d\n\n"
    )
    assert items == [
        SseEvent(data="a", retry=3000),
        SseEvent(data="b"),
        SseEvent(data="c"),
        SseEvent(data="d"),
    ]
    assert decoder.reconnection_time == 3000


def test_retry_in_a_block_without_data_goes_with_the_next_event() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"retry: 50\n\ndata: a\n\ndata: b\n\n") == [SseEvent(data="a", retry=50), SseEvent(data="b")]
    assert decoder.reconnection_time == 50


def test_bom_at_stream_start_is_ignored_even_when_split() -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n"
    assert assert_split_invariant(SseDecoder, stream) == [SseEvent(data="x")]


def test_only_the_first_bom_is_ignored() -> None:
    # The second BOM is part of the field name, which then is not "data".
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n") == [SseEvent(data="y")]


def test_invalid_utf8_is_replaced() -> None:
    assert decode(b"data: a\xffb\xe2\x82\n\n") == [SseEvent(data="a\ufffdb\ufffd")]


def test_multibyte_characters_split_anywhere_decode_the_same() -> None:
    stream = "data: h\u00e9llo \u4e16\u754c \U0001f600\U0001f9e0\n\n".encode()
    assert assert_split_invariant(SseDecoder, stream) == [SseEvent(data="h\u00e9llo \u4e16\u754c \U0001f600\U0001f9e0")]


def test_event_cut_short_at_close_is_reported_not_dispatched() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'data: done\n\ndata: {"partial"') == [SseEvent(data="done")]
    [error] = decoder.close()
    assert isinstance(error, FramingError)
    assert error.kind is FramingErrorKind.INCOMPLETE
    assert error.raw == b'{"partial"'
    assert not error.fatal


def test_event_missing_only_its_blank_line_is_incomplete() -> None:
    [error] = decode(b"data: a\ndata: b\n")
    assert isinstance(error, FramingError)
    assert error.kind is FramingErrorKind.INCOMPLETE
    assert error.raw == b"a\nb"


def test_trailing_comment_or_dataless_block_at_close_is_not_reported() -> None:
    assert decode(b"data: a\n\n: keep-alive") == [SseEvent(data="a")]
    assert decode(b"data: a\n\nevent: x\n") == [SseEvent(data="a")]


def test_truncated_utf8_at_close_is_replaced() -> None:
    [error] = decode(b"data: \xf0\x9f\x98")
    assert isinstance(error, FramingError)
    assert error.raw == "\ufffd".encode()


def test_openai_style_stream() -> None:
    chunks = [
        b'data: {"id":"c1","choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
        b'data: {"id":"c1","choices":[{"delta":{"content":"Bonjour \xf0\x9f\x91\x8b"}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert [item.data for item in decode(b"".join(chunks))] == [
        '{"id":"c1","choices":[{"delta":{"role":"assistant","content":""}}]}',
        '{"id":"c1","choices":[{"delta":{"content":"Bonjour \U0001f44b"}}]}',
        "[DONE]",
    ]


def test_anthropic_style_stream_with_event_types() -> None:
    stream = (
        b'event: message_start\ndata: {"type":"message_start"}\n\n'
        b'event: ping\ndata: {"type": "ping"}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert [item.event for item in assert_split_invariant(SseDecoder, stream)] == [
        "message_start",
        "ping",
        "message_stop",
    ]


def test_oversized_line_is_reported_and_its_event_skipped() -> None:
    stream = b"data: ok\n\ndata: " + b"x" * 100 + b"\ndata: more\n\ndata: after\n\n"
    items = assert_split_invariant(lambda: SseDecoder(max_item_size=64), stream)
    assert items[0] == SseEvent(data="ok")
    assert isinstance(items[1], FramingError)
    assert items[1].kind is FramingErrorKind.OVERSIZED
    assert items[2:] == [SseEvent(data="after")]


def test_oversized_event_of_many_small_lines_is_reported() -> None:
    stream = b"data: 0123456789\n" * 10 + b"\ndata: after\n\n"
    items = decode_whole(lambda: SseDecoder(max_item_size=64), stream)
    assert [type(item) for item in items] == [FramingError, SseEvent]
    assert items[0].kind is FramingErrorKind.OVERSIZED


def test_oversized_partial_line_is_not_buffered() -> None:
    decoder = SseDecoder(max_item_size=1024)
    items = []
    for _ in range(100):
        items += decoder.feed(b"y" * 1000)
    assert decoder._partial_len <= 1024
    assert len(items) == 1
    assert decoder.feed(b"\n\ndata: next\n\n") == [SseEvent(data="next")]


# Property tests --------------------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=12) | st.sampled_from(
    ["", " lead", "\U0001f600", "\u00e9\u4e16", ":", "a: b"]
)
_event_spec = st.tuples(
    st.none() | _text.filter(lambda s: "\x00" not in s),  # event type
    st.lists(_text, min_size=1, max_size=3),  # data lines
    st.none() | _text.filter(lambda s: "\x00" not in s),  # id
)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[SseEvent]]:
    """A valid stream with random line ends and comments, and the events it must decode to."""
    specs = draw(st.lists(_event_spec, max_size=6))
    ends = st.sampled_from(["\n", "\r", "\r\n"])
    parts: list[str] = ["\ufeff"] if draw(st.booleans()) else []
    expected: list[SseEvent] = []
    last_id: str | None = None
    for event_type, data_lines, event_id in specs:
        if draw(st.booleans()):
            parts.append(": keep-alive \U0001f493" + draw(ends))
        if event_type is not None:
            parts.append(f"event: {event_type}{draw(ends)}")
        for line in data_lines:
            parts.append(f"data: {line}{draw(ends)}")
        if event_id is not None:
            parts.append(f"id: {event_id}{draw(ends)}")
            last_id = event_id
        # A blank line right after a CR line end must not start with LF, or the two would make one CRLF.
        parts.append(draw(st.sampled_from(["\r", "\r\n"])) if parts[-1].endswith("\r") else draw(ends))
        expected.append(SseEvent(event=event_type or "message", data="\n".join(data_lines), id=last_id))
    return "".join(parts).encode(), expected


@given(sse_streams(), st.data())
def test_any_chunking_of_a_valid_stream_gives_the_expected_events(
    stream: tuple[bytes, list[SseEvent]], data: st.DataObject
) -> None:
    raw, expected = stream
    assert decode_whole(SseDecoder, raw) == expected
    assert decode_split(SseDecoder, raw, data.draw(chunkings(raw))) == expected


_noisy_bytes = st.lists(
    st.sampled_from(
        [
            b"data: ",
            b"data:",
            b"event: x",
            b"id: 1",
            b"retry: 9",
            b":c",
            b"\r",
            b"\n",
            b"\r\n",
            b"a",
            b"\xf0\x9f\x98\x80",
            b"\xe9",
            b"\xef\xbb\xbf",
            b"z" * 20,
        ]
    ),
    max_size=40,
).map(b"".join)


@given(_noisy_bytes, st.data())
def test_any_chunking_of_any_bytes_gives_the_same_items(raw: bytes, data: st.DataObject) -> None:
    def make() -> SseDecoder:
        return SseDecoder(comments=True, max_item_size=16)

    assert decode_split(make, raw, data.draw(chunkings(raw))) == decode_whole(make, raw)


def test_decoder_exposes_the_last_event_id_for_reconnecting() -> None:
    decoder = SseDecoder()
    assert decoder.last_event_id is None
    decoder.feed(b"id: 41\ndata: a\n\nid: 42\n")
    assert decoder.last_event_id == "42"


def test_retry_with_thousands_of_digits_is_ignored_not_a_crash() -> None:
    assert decode(b"retry: " + b"9" * 10_000 + b"\ndata: a\n\n") == [SseEvent(data="a")]
