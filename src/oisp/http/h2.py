"""Passive HTTP/2 decoding from frames (hyperframe) and HPACK (hpack): :class:`Http2Decoder`.

The ``h2`` package's state machine belongs to an endpoint (it answers, enforces flow control, raises on what it
would refuse); an observer only needs to read. So each direction is cut into frames, header blocks (HEADERS or
PUSH_PROMISE plus CONTINUATION) are assembled and decoded with that direction's own HPACK decoder, and each
client-initiated stream becomes one :class:`~oisp.http.exchange.HttpExchange`.

HPACK state is per direction, and every header block is decoded, including those of pushed streams and of
streams already reset, or the dynamic table would go out of step. The dynamic table limit a direction's decoder
allows is what the *receiver* of that direction advertised in ``SETTINGS_HEADER_TABLE_SIZE``: raised as soon
as the receiver's SETTINGS goes by (the sender may use it right away), lowered once the sender acknowledges
those SETTINGS (from then on it must have shrunk its table).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Final, Literal

import attrs
import hpack
from h2.errors import ErrorCodes
from hpack.exceptions import HPACKError
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from oisp.errors import ProtocolError
from oisp.http._progress import (
    CONNECTION_CLOSED_BEFORE_REQUEST,
    CONNECTION_CLOSED_BEFORE_RESPONSE,
    ExchangeProgress,
    GuardedListener,
    WebSocketProgress,
    check_body_cap,
    decode_field_text,
    describe_protocol_error,
)
from oisp.http.exchange import (
    DEFAULT_BODY_CAP,
    ConnectionInfo,
    ExchangeListener,
    Headers,
    HttpExchange,
    HttpRequest,
    HttpResponse,
)

__all__ = ["DEFAULT_MAX_TABLE_SIZE", "H2_CLIENT_PREFACE", "Http2Decoder"]

logger = logging.getLogger(__name__)

#: The bytes an HTTP/2 client sends before its first frame (RFC 9113, section 3.4).
H2_CLIENT_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Largest header block (HEADERS + CONTINUATION fragments, still compressed) accepted.
MAX_HEADER_BLOCK: Final = 1024 * 1024
#: Largest decoded header list accepted (HPACK's own default of 64 KiB is tight for an observer).
MAX_HEADER_LIST: Final = 1024 * 1024
#: Default cap of the HPACK dynamic table mirrored for each direction (RFC 7541 sizes: name + value + 32 per
#: entry). A peer may allow its sender up to 4 GiB; a sender whose table actually grows beyond the cap stops the
#: decoding of its connection (never the relay). One header block adds at most MAX_HEADER_BLOCK and a bit.
DEFAULT_MAX_TABLE_SIZE: Final = 256 * 1024
_FRAME_HEADER_SIZE: Final = 9
#: Streams a client may reset before their response before its connection counts as a reset flood (CVE-2023-44487,
#: "rapid reset"): from then on, a stream reset before the listener heard of it is only counted, and the count is
#: reported once, as one partial exchange, when the connection ends (thousands of reset streams are one event).
RESET_FLOOD_THRESHOLD: Final = 100


@attrs.define
class _HeaderBlock:
    """A header block being assembled from HEADERS/PUSH_PROMISE and CONTINUATION frames."""

    stream_id: int
    end_stream: bool
    push: bool
    fragments: list[bytes]
    size: int


class _Direction:
    """One direction of the connection: its unparsed bytes, its HPACK decoder, its header block in progress."""

    def __init__(self, name: Literal["client", "server"], *, expect_preface: bool) -> None:
        self.name = name
        self.buffer = bytearray()
        self.preface_pending = expect_preface
        self.hpack = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.header_block: _HeaderBlock | None = None
        #: HEADER_TABLE_SIZE of each SETTINGS the *peer* sent that this direction has not acknowledged yet
        #: (None for a SETTINGS without it); acknowledgements come in order.
        self.unacked_table_sizes: collections.deque[int | None] = collections.deque()


class _Malformed(ProtocolError):
    """The traffic breaks HTTP/2 so that decoding cannot go on (framing or HPACK state lost)."""


class Http2Decoder:
    """Passive decoder of one HTTP/2 connection: every client stream becomes its own exchange
    (``stream_id`` set). Implements :class:`oisp.http.passive.PassiveDecoder`."""

    def __init__(
        self,
        connection: ConnectionInfo,
        listener: ExchangeListener,
        *,
        body_cap: int = DEFAULT_BODY_CAP,
        max_table_size: int = DEFAULT_MAX_TABLE_SIZE,
    ) -> None:
        """``max_table_size`` caps the HPACK dynamic table mirrored for each direction: a sender whose table grows
        beyond it (its peer may allow up to 4 GiB) stops the decoding of the connection, with that reason."""
        self._connection = connection
        self._max_table_size = max_table_size
        self._listener = GuardedListener(listener)
        self._body_cap = check_body_cap(body_cap)
        self._default_scheme = "https" if connection.tls else "http"
        self._client = _Direction("client", expect_preface=True)
        self._server = _Direction("server", expect_preface=False)
        self._streams: dict[int, ExchangeProgress] = {}
        #: Streams an extended CONNECT turned into WebSockets (RFC 8441), by stream id.
        self._websockets: dict[int, WebSocketProgress] = {}
        #: Which directions of a WebSocket's stream have ended (END_STREAM).
        self._websocket_ends: dict[int, set[str]] = {}
        self._last_client_stream = 0
        #: Streams the client reset before their response (the reset-flood detector).
        self._early_resets = 0
        #: In a reset flood: streams reset that were only counted, and the last of them (reported at the end).
        self._folded_resets = 0
        self._folded_example: ExchangeProgress | None = None
        self._error: str | None = None
        self._stopped = False

    @property
    def error(self) -> str | None:
        """Why decoding stopped early (malformed traffic); None while decoding is healthy."""
        return self._error

    def feed_client(self, data: bytes, now_ns: int | None = None) -> None:
        """Bytes the client sent to the server."""
        self._feed(self._client, data, now_ns)

    def feed_server(self, data: bytes, now_ns: int | None = None) -> None:
        """Bytes the server sent to the client."""
        self._feed(self._server, data, now_ns)

    def client_closed(self, now_ns: int | None = None) -> None:
        """The client finished sending: requests still incomplete are cut; their responses may still come."""
        if self._stopped:
            return
        for progress in list(self._streams.values()):
            progress.request_cut(CONNECTION_CLOSED_BEFORE_REQUEST)
            self._forget_if_ended(progress)

    def server_closed(self, now_ns: int | None = None) -> None:
        """The server finished sending: every open stream ends as partial, decoding stops."""
        if self._stopped:
            return
        self._end_all(CONNECTION_CLOSED_BEFORE_RESPONSE, CONNECTION_CLOSED_BEFORE_REQUEST)
        self._stopped = True

    def abort(self, reason: str) -> None:
        """The connection died; every open exchange ends as partial with ``reason``."""
        if self._stopped:
            return
        self._end_all(reason, reason)
        self._stopped = True

    # -- framing ---------------------------------------------------------------------------------------------

    def _feed(self, direction: _Direction, data: bytes, now_ns: int | None) -> None:
        if self._stopped or not data:
            return
        now = time.monotonic_ns() if now_ns is None else now_ns
        direction.buffer += data
        try:
            if direction.preface_pending and not self._consume_preface(direction):
                return
            for frame in self._complete_frames(direction):
                self._on_frame(direction, frame, now)
                if self._stopped:
                    return
        except _Malformed as exc:
            self._fail(str(exc))

    @staticmethod
    def _consume_preface(direction: _Direction) -> bool:
        buffer = direction.buffer
        size = min(len(buffer), len(H2_CLIENT_PREFACE))
        if buffer[:size] != H2_CLIENT_PREFACE[:size]:
            raise _Malformed("invalid HTTP/2 client connection preface")
        if size < len(H2_CLIENT_PREFACE):
            return False
        del buffer[:size]
        direction.preface_pending = False
        return True

    @staticmethod
    def _complete_frames(direction: _Direction) -> list[Frame]:
        """Cut every complete frame off the front of the direction's buffer."""
        buffer = direction.buffer
        available = len(buffer)
        frames: list[Frame] = []
        position = 0
        try:
            with memoryview(buffer) as view:
                while available - position >= _FRAME_HEADER_SIZE:
                    length = int.from_bytes(view[position : position + 3], "big")
                    end = position + _FRAME_HEADER_SIZE + length
                    if end > available:
                        break
                    frame, _ = Frame.parse_frame_header(view[position : position + _FRAME_HEADER_SIZE])
                    frame.parse_body(view[position + _FRAME_HEADER_SIZE : end])
                    frames.append(frame)
                    position = end
        except (HyperframeError, ValueError) as exc:
            # Decoding stops here, so the buffer (still exported to the traceback's views) is left as it is.
            raise _Malformed(
                f"malformed HTTP/2 frame from {direction.name}: {describe_protocol_error(exc)}"
            ) from None
        del buffer[:position]
        return frames

    def _on_frame(self, direction: _Direction, frame: Frame, now: int) -> None:
        block = direction.header_block
        if block is not None:
            if not isinstance(frame, ContinuationFrame) or frame.stream_id != block.stream_id:
                raise _Malformed(f"{direction.name} interrupted a header block with {type(frame).__name__}")
            self._add_fragment(direction, block, frame.data)
            if "END_HEADERS" in frame.flags:
                self._on_header_block(direction, now)
            return
        if isinstance(frame, DataFrame):
            self._on_data(direction, frame, now)
        elif isinstance(frame, HeadersFrame | PushPromiseFrame):
            push = isinstance(frame, PushPromiseFrame)
            if push and direction is self._client:
                raise _Malformed("client sent PUSH_PROMISE")
            direction.header_block = _HeaderBlock(
                stream_id=frame.stream_id,
                end_stream="END_STREAM" in frame.flags,
                push=push,
                fragments=[],
                size=0,
            )
            self._add_fragment(direction, direction.header_block, frame.data)
            if "END_HEADERS" in frame.flags:
                self._on_header_block(direction, now)
        elif isinstance(frame, ContinuationFrame):
            raise _Malformed(f"{direction.name} sent CONTINUATION outside a header block")
        elif isinstance(frame, RstStreamFrame):
            self._on_reset(direction, frame)
        elif isinstance(frame, SettingsFrame):
            self._on_settings(direction, frame)
        elif isinstance(frame, GoAwayFrame):
            self._on_goaway(direction, frame)
        # PRIORITY, WINDOW_UPDATE, PING, ALTSVC and unknown extension frames carry nothing an observer needs.

    @staticmethod
    def _add_fragment(direction: _Direction, block: _HeaderBlock, fragment: bytes) -> None:
        block.size += len(fragment)
        if block.size > MAX_HEADER_BLOCK:
            raise _Malformed(f"{direction.name} header block larger than {MAX_HEADER_BLOCK} bytes")
        block.fragments.append(fragment)

    # -- settings and headers ------------------------------------------------------------------------------

    def _on_settings(self, direction: _Direction, frame: SettingsFrame) -> None:
        if "ACK" in frame.flags:
            # ``direction``'s sender acknowledges the peer's oldest outstanding SETTINGS: from now on its
            # encoder respects that table size, so the decoder of its header blocks enforces it.
            if direction.unacked_table_sizes:
                size = direction.unacked_table_sizes.popleft()
                if size is not None:
                    direction.hpack.max_allowed_table_size = size
            return
        peer = self._server if direction is self._client else self._client
        size = frame.settings.get(SettingsFrame.HEADER_TABLE_SIZE)
        peer.unacked_table_sizes.append(size)
        if size is not None and size > peer.hpack.max_allowed_table_size:
            peer.hpack.max_allowed_table_size = size

    def _on_header_block(self, direction: _Direction, now: int) -> None:
        block = direction.header_block
        assert block is not None
        direction.header_block = None
        try:
            fields = direction.hpack.decode(b"".join(block.fragments), raw=True)
        except HPACKError as exc:
            raise _Malformed(
                f"HPACK decoding of {direction.name} headers failed: {describe_protocol_error(exc)}"
            ) from exc
        table_size = direction.hpack.header_table._current_size
        if table_size > self._max_table_size:
            direction.hpack = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)  # the memory goes now
            raise _Malformed(
                f"{direction.name} grew its HPACK table to {table_size} bytes, beyond the decoder's cap of "
                f"{self._max_table_size}"
            )
        if block.push:
            return  # server push is not an exchange the client asked for; decoded only to keep HPACK in step
        raw = [(bytes(name), bytes(value)) for name, value in fields]
        if direction is self._client:
            self._on_client_headers(block.stream_id, raw, block.end_stream, now)
        else:
            self._on_server_headers(block.stream_id, raw, block.end_stream, now)

    def _on_client_headers(
        self, stream_id: int, fields: list[tuple[bytes, bytes]], end_stream: bool, now: int
    ) -> None:
        progress = self._streams.get(stream_id)
        if progress is None:
            if stream_id <= self._last_client_stream or stream_id % 2 == 0:
                return  # a stream already over, or not the client's
            self._last_client_stream = stream_id
            progress = self._open_stream(stream_id, fields, now)
            if end_stream:
                progress.request_done(None, now)
        else:
            # A second header block on a stream is the trailer section (it carries END_STREAM).
            progress.request_done(_split_pseudo(fields)[1], now)
        self._forget_if_ended(progress)

    def _open_stream(self, stream_id: int, fields: list[tuple[bytes, bytes]], now: int) -> ExchangeProgress:
        pseudo, headers = _split_pseudo(fields)
        authority = pseudo.get(":authority") or headers.get("host")
        path = pseudo.get(":path")
        request = HttpRequest(
            method=pseudo.get(":method", ""),
            target=path if path is not None else authority or "",
            authority=authority,
            scheme=pseudo.get(":scheme", self._default_scheme),
            http_version="2",
            headers=headers,
            protocol=pseudo.get(":protocol"),
        )
        exchange = HttpExchange(connection=self._connection, request=request, stream_id=stream_id)
        exchange.timings.request_start = now
        progress = ExchangeProgress(exchange, self._listener, self._body_cap)
        # In a reset flood, a stream's request is told to the listener only once its response starts (or the
        # stream ends otherwise), so that a stream reset before that can be folded into the flood's one event.
        progress.defer_request = self._early_resets >= RESET_FLOOD_THRESHOLD
        self._streams[stream_id] = progress
        return progress

    def _on_server_headers(
        self, stream_id: int, fields: list[tuple[bytes, bytes]], end_stream: bool, now: int
    ) -> None:
        progress = self._streams.get(stream_id)
        if progress is None:
            return  # a pushed stream, or one already over
        pseudo, headers = _split_pseudo(fields)
        if progress.exchange.response is None:
            status_text = pseudo.get(":status", "")
            if not (len(status_text) == 3 and status_text.isdigit()):
                progress.end(f"response on stream {stream_id} has no valid :status ({status_text!r})")
                self._forget_if_ended(progress)
                return
            status = int(status_text)
            if 100 <= status < 200:
                return  # informational (100 Continue, 103 Early Hints): not the response
            response = HttpResponse(status=status, reason="", http_version="2", headers=headers)
            progress.response_head(response, now)
            if end_stream:
                progress.response_done(None, now)
            elif 200 <= status < 300 and progress.exchange.request.method == "CONNECT" \
                    and progress.exchange.request.asks_websocket:
                self._websockets[stream_id] = WebSocketProgress(progress, self._listener, response, self._body_cap,
                                                                self._connection.connection_id)
        else:
            progress.response_done(headers, now)
        self._forget_if_ended(progress)

    # -- data and stream ends ------------------------------------------------------------------------------

    def _on_data(self, direction: _Direction, frame: DataFrame, now: int) -> None:
        progress = self._streams.get(frame.stream_id)
        if progress is None:
            return
        end_stream = "END_STREAM" in frame.flags
        websocket = self._websockets.get(frame.stream_id)
        if websocket is not None:
            client = direction is self._client
            if frame.data:
                websocket.feed(websocket.client if client else websocket.server, frame.data, now)
            if end_stream:  # the WebSocket ends when both directions of its stream have
                ended = self._websocket_ends.setdefault(frame.stream_id, set())
                ended.add(direction.name)
                if len(ended) == 2:
                    self._end_websocket(frame.stream_id, now)
            return
        if direction is self._client:
            progress.request_data(frame.data)
            if end_stream:
                progress.request_done(None, now)
        else:
            if progress.exchange.response is None:
                progress.end(f"server sent DATA before a response head on stream {frame.stream_id}")
            else:
                progress.response_data(frame.data, now)
                if end_stream:
                    progress.response_done(None, now)
        self._forget_if_ended(progress)

    def _end_websocket(self, stream_id: int, now: int, reason: str | None = None) -> None:
        websocket = self._websockets.pop(stream_id, None)
        self._websocket_ends.pop(stream_id, None)
        self._streams.pop(stream_id, None)
        if websocket is not None:
            websocket.end(now, reason)

    def _on_reset(self, direction: _Direction, frame: RstStreamFrame) -> None:
        if frame.stream_id in self._websockets:
            self._end_websocket(frame.stream_id, time.monotonic_ns(),
                                f"stream reset by {direction.name} ({_error_name(frame.error_code)})")
            return
        progress = self._streams.pop(frame.stream_id, None)
        if progress is None:
            return
        reason = f"stream reset by {direction.name} ({_error_name(frame.error_code)})"
        if direction is self._client and progress.exchange.response is None:
            self._early_resets += 1
            if not progress.request_delivered and self._early_resets > RESET_FLOOD_THRESHOLD:
                self._folded_resets += 1
                self._folded_example = progress  # the listener never heard of the others: nothing to end
                return
        progress.end(reason)

    def _report_folded_resets(self) -> None:
        """The reset flood's one event: the last stream folded into it, saying how many there were."""
        example, self._folded_example = self._folded_example, None
        if example is not None:
            example.end(f"rapid reset: the client reset {self._folded_resets} streams before their response "
                        f"(after {RESET_FLOOD_THRESHOLD} reported one by one); they are reported as this one "
                        "exchange")

    def _on_goaway(self, direction: _Direction, frame: GoAwayFrame) -> None:
        if direction is not self._server:
            return  # the client's GOAWAY concerns pushed streams, which are not decoded
        reason = (f"stream not processed: server sent GOAWAY "
                  f"(last_stream_id={frame.last_stream_id}, {_error_name(frame.error_code)})")
        for stream_id in sorted(self._streams):
            if stream_id > frame.last_stream_id:
                self._streams.pop(stream_id).end(reason)

    def _forget_if_ended(self, progress: ExchangeProgress) -> None:
        if progress.ended:
            self._streams.pop(progress.exchange.stream_id or 0, None)

    # -- ending ----------------------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        logger.warning("connection %s: %s; HTTP/2 decoding of this connection stops",
                       self._connection.connection_id, reason)
        self._error = reason
        self._end_all(reason, reason)
        self._stopped = True

    def _end_all(self, missing_response: str, missing_request: str) -> None:
        self._report_folded_resets()
        for stream_id in sorted(self._websockets):
            # The connection ending ends a WebSocket (partial only if a message was cut or an error says so).
            self._end_websocket(stream_id, time.monotonic_ns(),
                                None if missing_response == CONNECTION_CLOSED_BEFORE_RESPONSE else missing_response)
        streams, self._streams = self._streams, {}
        for stream_id in sorted(streams):
            streams[stream_id].end_cut(missing_response, missing_request)


def _split_pseudo(fields: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], Headers]:
    """Pseudo-header fields (first occurrence each) and the regular fields of a decoded header list."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for raw_name, raw_value in fields:
        name = decode_field_text(raw_name)
        value = decode_field_text(raw_value)
        if name.startswith(":"):
            pseudo.setdefault(name, value)
        else:
            regular.append((name, value))
    return pseudo, Headers(regular)


def _error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code 0x{code:x}"
