"""Sans-io decoders of the stream framings AI APIs answer with: SSE, NDJSON, streamed JSON arrays, AWS eventstream,
and the length-prefixed messages of gRPC, gRPC-Web and Connect.

Provider plugins (built-in and third-party) feed each decoder the response body as it arrives, in chunks split
anywhere, and get back complete items::

    decoder = SseDecoder()
    for chunk in body_chunks:
        for item in decoder.feed(chunk):
            ...
    for item in decoder.close():
        ...

The items returned over a whole stream are the same however it was split. Decoders never raise on bad input:
what cannot be decoded comes back, in stream order, as a :class:`FramingError` item (``kind`` says why, ``fatal``
whether the decoder stopped), so the provider can mark the event it builds as partial. Memory is bounded by
``max_item_size`` (default :data:`DEFAULT_MAX_ITEM_SIZE`, 16 MiB): a larger item is reported and skipped.
"""

from oisp.framing._contract import (
    DEFAULT_MAX_ITEM_SIZE,
    DecoderClosedError,
    FramingError,
    FramingErrorKind,
    StreamDecoder,
)
from oisp.framing.eventstream import EventStreamDecoder, EventStreamMessage, HeaderValue, encode_message
from oisp.framing.grpc import GrpcFrameDecoder, GrpcMessage, parse_trailer_block
from oisp.framing.jsonarray import JsonArrayDecoder, JsonArrayElement
from oisp.framing.ndjson import NdjsonDecoder, NdjsonValue
from oisp.framing.sse import SseComment, SseDecoder, SseEvent

__all__ = [
    "DEFAULT_MAX_ITEM_SIZE",
    "DecoderClosedError",
    "EventStreamDecoder",
    "EventStreamMessage",
    "FramingError",
    "FramingErrorKind",
    "GrpcFrameDecoder",
    "GrpcMessage",
    "HeaderValue",
    "JsonArrayDecoder",
    "JsonArrayElement",
    "NdjsonDecoder",
    "NdjsonValue",
    "SseComment",
    "SseDecoder",
    "SseEvent",
    "StreamDecoder",
    "encode_message",
    "parse_trailer_block",
]
