from __future__ import annotations

import pytest

from oisp.errors import ConfigurationError, OispError, ProtocolError
from oisp.framing import (
    DEFAULT_MAX_ITEM_SIZE,
    DecoderClosedError,
    EventStreamDecoder,
    FramingError,
    FramingErrorKind,
    GrpcFrameDecoder,
    JsonArrayDecoder,
    NdjsonDecoder,
    SseDecoder,
    StreamDecoder,
)

DECODERS = [SseDecoder, NdjsonDecoder, JsonArrayDecoder, EventStreamDecoder, GrpcFrameDecoder]


def test_default_item_limit_is_16_mib() -> None:
    assert DEFAULT_MAX_ITEM_SIZE == 16 * 1024 * 1024


@pytest.mark.parametrize("decoder_class", DECODERS)
def test_feed_after_close_raises_a_decoder_closed_error(decoder_class: type[StreamDecoder[object]]) -> None:
    decoder = decoder_class()
    decoder.close()
    with pytest.raises(DecoderClosedError, match=r"feed\(\) called after close\(\)"):
        decoder.feed(b"x")
    assert isinstance(DecoderClosedError(), OispError)


@pytest.mark.parametrize("decoder_class", DECODERS)
def test_close_twice_returns_nothing_new(decoder_class: type[StreamDecoder[object]]) -> None:
    decoder = decoder_class()
    decoder.feed(b"[{")
    decoder.close()
    assert decoder.close() == []


@pytest.mark.parametrize("decoder_class", DECODERS)
@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_max_item_size_must_be_a_positive_int(decoder_class: type[SseDecoder], limit: object) -> None:
    with pytest.raises(ConfigurationError, match="max_item_size"):
        decoder_class(max_item_size=limit)  # type: ignore[arg-type]


def test_error_item_message_says_where_and_what() -> None:
    error = FramingError("ndjson", FramingErrorKind.MALFORMED, "invalid JSON: Expecting value (column 1)", line=3)
    assert error.message == "ndjson line 3: invalid JSON: Expecting value (column 1)"
    fatal = FramingError("eventstream", FramingErrorKind.CHECKSUM, "prelude CRC mismatch", offset=40, fatal=True)
    assert fatal.message == "eventstream at byte 40: prelude CRC mismatch (decoding stopped)"
    exception = fatal.to_exception()
    assert isinstance(exception, ProtocolError)
    assert str(exception) == fatal.message


def test_error_item_repr_leaves_out_the_raw_bytes() -> None:
    error = FramingError("sse", FramingErrorKind.INCOMPLETE, "cut short", raw=b"secret body")
    assert "secret" not in repr(error)
