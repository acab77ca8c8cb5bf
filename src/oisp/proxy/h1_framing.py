"""Sans-io HTTP/1.1 message boundaries in one direction of a byte stream, for the proxy's own decisions.

The passive decoders (:mod:`oisp.http`) read copies; this module is for the few places where the proxy itself must
know where a message begins and ends: rewriting request heads (reverse mode, plain-HTTP forwarding in explicit mode)
and knowing when every response on a connection has been delivered. :class:`MessageFramer` splits a stream into
heads and body bytes without re-encoding anything; what a head means for the body that follows (RFC 9112 §6) is
decided by :func:`request_body` and :func:`response_body`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator

import attrs

from oisp.errors import ProtocolError

__all__ = [
    "MAX_HEAD",
    "Body",
    "Framing",
    "MessageFramer",
    "ResponseTracker",
    "chunk_size",
    "header_lines",
    "request_body",
    "response_body",
]

#: Longest head (and chunk-size or trailer line) accepted.
MAX_HEAD = 64 * 1024


class Body(enum.Enum):
    """How the body after a head is delimited."""

    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    #: Everything after the head, until the connection closes (a close-delimited response, or the bytes after an
    #: Upgrade or CONNECT: no longer HTTP/1.1).
    UNTIL_CLOSE = "until-close"


@attrs.frozen
class Framing:
    """The body that follows a head: its kind and, for :attr:`Body.LENGTH`, its length."""

    body: Body
    length: int = 0


NO_BODY = Framing(Body.NONE)


def header_lines(head: bytes) -> tuple[bytes, list[bytes]]:
    """A head (ending with the blank line) split into its start line and its header lines, byte for byte."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else head.rstrip(b"\r\n").split(b"\r\n")
    return lines[0], lines[1:]


def _fields(lines: list[bytes]) -> tuple[int | None, bool, bool]:
    """Content-Length (None when absent), whether the last transfer coding is chunked, whether Upgrade is set."""
    length: int | None = None
    transfer_encoding: list[bytes] = []
    upgrade = False
    for line in lines:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            try:
                value_length = int(value.strip())
            except ValueError:
                raise ProtocolError("invalid Content-Length") from None
            if value_length < 0 or (length is not None and length != value_length):
                raise ProtocolError("invalid or conflicting Content-Length")
            length = value_length
        elif lname == b"transfer-encoding":
            transfer_encoding += [c.strip().lower() for c in value.split(b",") if c.strip()]
        elif lname == b"upgrade":
            upgrade = True
    if transfer_encoding and transfer_encoding[-1] != b"chunked":
        raise ProtocolError("Transfer-Encoding whose last coding is not chunked")
    return length, bool(transfer_encoding), upgrade


def chunk_size(line: bytes) -> int:
    """The size a chunk-size line (stripped, not empty) announces; its extensions are ignored."""
    try:
        size = int(line.split(b";", 1)[0], 16)
    except ValueError:
        raise ProtocolError(f"invalid chunk size line {line[:40]!r}") from None
    if size < 0:
        raise ProtocolError("negative chunk size")
    return size


def request_body(method: bytes, lines: list[bytes]) -> Framing:
    """The body of a request with these header lines (RFC 9112 §6.3); CONNECT and Upgrade hand the connection
    over to another protocol once the request is sent."""
    length, chunked, upgrade = _fields(lines)
    if method.upper() == b"CONNECT" or upgrade:
        return Framing(Body.UNTIL_CLOSE)
    if chunked:
        return Framing(Body.CHUNKED)
    if length:
        return Framing(Body.LENGTH, length)
    return NO_BODY


def response_body(request_method: bytes | None, status: int, lines: list[bytes]) -> Framing:
    """The body of a response to ``request_method`` (RFC 9112 §6.3)."""
    if status == 101 or (request_method is not None and request_method.upper() == b"CONNECT" and 200 <= status < 300):
        return Framing(Body.UNTIL_CLOSE)
    if status < 200 or status in (204, 304) or (request_method or b"").upper() == b"HEAD":
        return NO_BODY
    length, chunked, _ = _fields(lines)
    if chunked:
        return Framing(Body.CHUNKED)
    if length is not None:
        return Framing(Body.LENGTH, length) if length else NO_BODY
    return Framing(Body.UNTIL_CLOSE)


class MessageFramer:
    """Splits one direction of an HTTP/1.1 connection into heads and body bytes, in order.

    :meth:`feed` yields ``("head", bytes)`` for each complete head and ``("data", bytes)`` for everything else
    (body bytes, chunk-size lines, trailers), exactly as received. After each head the caller says how its body is
    framed with :meth:`frame` before advancing the iterator. Incomplete heads and chunk-size lines are held back
    (at most :data:`MAX_HEAD` bytes); body bytes never are.
    """

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self._partial = bytearray()
        self._state = "head"
        self._remaining = 0
        self._framing: Framing | None = None
        #: Messages whose end has been seen.
        self.messages_completed = 0

    @property
    def at_message_start(self) -> bool:
        """True between messages (nothing of the next head seen yet)."""
        return self._state == "head" and not self._partial

    def frame(self, framing: Framing) -> None:
        """How the body of the head just yielded is delimited."""
        self._framing = framing

    def feed(self, data: bytes) -> Iterator[tuple[str, bytes]]:
        """The heads and data in ``data`` (see the class docstring)."""
        view = memoryview(data)
        offset, size = 0, len(data)
        while offset < size:
            state = self._state
            if state == "raw":
                yield "data", data if offset == 0 else bytes(view[offset:])
                return
            if state in ("body", "chunk-data"):
                take = min(self._remaining, size - offset)
                yield "data", data if take == size else bytes(view[offset:offset + take])
                offset += take
                self._remaining -= take
                if self._remaining == 0:
                    if state == "body":
                        self._message_done()
                    else:
                        self._state = "chunk-size"
                continue
            if state == "head" and not self._partial and data.startswith(b"\r\n", offset):
                # a stray CRLF between messages (RFC 9112 §2.2 allows ignoring it): passed on as it is
                yield "data", b"\r\n"
                offset += 2
                continue
            separator = b"\r\n\r\n" if state == "head" else b"\r\n"
            if self._partial:
                # the end of the head or line may straddle what was held back from earlier feeds
                held = len(self._partial)
                self._partial += view[offset:]
                end = self._partial.find(separator, max(0, held - len(separator) + 1))
                if end >= 0:
                    end += len(separator)
                    piece = bytes(self._partial[:end])
                    offset += end - held
                    self._partial.clear()
            else:
                end = data.find(separator, offset)
                if end >= 0:
                    end += len(separator)
                    piece = data[offset:end]
                    offset = end
                else:
                    self._partial += view[offset:]
            if end < 0:
                if len(self._partial) > self.max_head:
                    raise ProtocolError(f"HTTP head or chunk line longer than {self.max_head} bytes")
                return
            if state == "head":
                head = piece.lstrip(b"\r\n")  # stray CRLFs that straddled two feeds
                if len(head) < len(piece):
                    yield "data", piece[:len(piece) - len(head)]
                if head:
                    yield from self._head(head)
            else:
                yield "data", piece
                self._line(piece)

    def _head(self, head: bytes) -> Iterator[tuple[str, bytes]]:
        self._framing = None
        yield "head", head
        framing = self._framing
        if framing is None:
            raise RuntimeError("MessageFramer: frame() was not called after a head")
        if framing.body is Body.NONE:
            self._message_done()
        elif framing.body is Body.LENGTH:
            self._state, self._remaining = "body", framing.length
        elif framing.body is Body.CHUNKED:
            self._state = "chunk-size"
        else:
            self._state = "raw"

    def _line(self, line: bytes) -> None:
        text = line.strip()
        if self._state == "trailers":
            if not text:
                self._message_done()
            return
        if not text:  # the CRLF that ends a chunk's data
            return
        size = chunk_size(text)
        if size == 0:
            self._state = "trailers"
        else:
            self._state, self._remaining = "chunk-data", size

    def _message_done(self) -> None:
        self._state = "head"
        self.messages_completed += 1


class ResponseTracker:
    """Knows, from the response bytes of a connection, when every request sent so far has its final response.

    The request side tells it each request's method (:meth:`request_sent`); :meth:`feed` follows the responses
    (interim 1xx responses, HEAD and 204/304 without bodies, chunked, length- and close-delimited ones).
    """

    def __init__(self) -> None:
        self._framer = MessageFramer()
        self._methods: deque[bytes] = deque()
        #: True once the response stream became something else (101, CONNECT) or close-delimited.
        self.until_close = False

    def request_sent(self, method: bytes) -> None:
        """A request with ``method`` went to the server."""
        self._methods.append(method)

    @property
    def idle(self) -> bool:
        """Every request sent has had its complete final response."""
        return not self._methods and self._framer.at_message_start and not self.until_close

    def feed(self, data: bytes) -> None:
        """Response bytes, as the server sent them."""
        for kind, head in self._framer.feed(data):
            if kind != "head":
                continue
            start, lines = header_lines(head)
            parts = start.split(b" ", 2)
            try:
                status = int(parts[1])
            except (IndexError, ValueError):
                raise ProtocolError(f"malformed status line {start[:100]!r}") from None
            method = self._methods[0] if self._methods else None
            framing = response_body(method, status, lines)
            if (status >= 200 or status == 101) and self._methods:  # interim responses leave it waiting
                self._methods.popleft()
            if framing.body is Body.UNTIL_CLOSE:
                self.until_close = True
            self._framer.frame(framing)
