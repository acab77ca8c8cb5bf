"""Not copying to the decoder what it would discard: HTTP/1.1 body bytes past the body cap.

The passive decoder stores at most ``body_cap`` bytes of each body and counts the rest (``wire_size``) without
looking at it. For a big upload or download most bytes are past the cap, yet each was copied, framed, sent to the
decoder process and parsed there. :class:`BodySkipper` follows the HTTP/1.1 message framing of one direction
(sans-io, the same RFC 9112 rules as :mod:`oisp.proxy.h1_framing`) and turns each copy into pieces: bytes to
copy, and counts of body bytes skipped, which the decoder adds to the body's size without seeing them
(``skip_client``/``skip_server`` of :class:`~oisp.http.h1.Http1Decoder`).

It skips only where the decoder's result cannot depend on the bytes, and leaves everything else as it was:

- bodies without ``Content-Encoding`` only (a coded body's decoded size is not its wire size), framed by
  ``Content-Length`` or chunked; never close-delimited bodies, nor anything after an Upgrade or CONNECT;
- only after ``cap + 1`` body bytes were copied (so the decoder has marked the body truncated), and never the
  last byte of a body or of a chunk (so the decoder sees each body and chunk end as it does today);
- at least :data:`MIN_SKIP` bytes at a time (smaller gaps are copied);
- anything it cannot follow (a malformed head or chunk line) turns it off for the rest of the direction: every
  byte is copied from then on, as before.

Nothing is held back: the bytes of a head or chunk line split across reads are copied at once (the skipper keeps
its own bounded copy of an incomplete line to parse it).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Literal, cast

from oisp.errors import ProtocolError
from oisp.proxy.h1_framing import MAX_HEAD, Body, chunk_size, header_lines, request_body, response_body
from oisp.proxy.relay import CopyFeed, Direction, SkipFeed

__all__ = ["MIN_SKIP", "BodySkipper", "Piece", "SkippingFeed", "skipping"]

logger = logging.getLogger(__name__)

#: The fewest bytes skipped at once; smaller gaps are copied (a skip marker costs a frame too).
MIN_SKIP = 4096
#: A copy, or a count of body bytes skipped.
Piece = bytes | int
_State = Literal["head", "body", "chunk-size", "chunk-data", "trailers", "off"]


class BodySkipper:
    """One direction of an HTTP/1.1 connection: which of its bytes the decoder needs (see the module docstring).

    The request side's skipper tells the response side's the request methods (HEAD and CONNECT change how a
    response is framed): make the two with :meth:`pair`.
    """

    @classmethod
    def pair(cls, cap: int) -> tuple[BodySkipper, BodySkipper]:
        """The skippers of a connection's requests (the client's bytes) and of its responses."""
        methods: deque[bytes] = deque()
        requests = cls(cap, request=True, methods=methods)
        requests.responses = cls(cap, request=False, methods=methods)
        return requests, requests.responses

    def __init__(self, cap: int, *, request: bool, methods: deque[bytes]) -> None:
        self.cap = cap
        self.request = request
        self._methods = methods
        #: The response side's skipper, on the request side: it cannot follow responses without the requests.
        self.responses: BodySkipper | None = None
        self._state: _State = "head"
        self._line = bytearray()
        self._remaining = 0  # of the current length body or chunk
        self._seen = 0  # body bytes of the current message so far (copied or skipped)
        self._skippable = False
        #: Body bytes skipped so far.
        self.skipped = 0

    @property
    def active(self) -> bool:
        """False once the skipper gave up on the direction (everything is copied)."""
        return self._state != "off"

    def feed(self, data: bytes) -> list[Piece]:
        """The pieces ``data`` becomes, in order: ``bytes`` to copy, ``int`` counts of body bytes skipped."""
        state = self._state
        if state == "off":
            return [data]
        if (state == "body" or state == "chunk-data") and not self._skippable and len(data) < self._remaining:
            self._remaining -= len(data)  # the common case of a body that is copied whole: one step
            self._seen += len(data)
            return [data]
        pieces: list[Piece] = []
        copy_from = 0  # start of the bytes not yet placed into ``pieces``
        offset, size = 0, len(data)
        try:
            while offset < size:
                state = self._state
                if state == "off":
                    break
                if state == "body" or state == "chunk-data":
                    take = min(self._remaining, size - offset)
                    if self._skippable:
                        # body offsets [seen, seen + take) of this segment; skip past the cap, never the last byte
                        start = max(self._seen, self.cap + 1)
                        end = min(self._seen + take, self._seen + self._remaining - 1)
                        if end - start >= MIN_SKIP:
                            at = offset + start - self._seen
                            if at > copy_from:
                                pieces.append(data[copy_from:at])
                            pieces.append(end - start)
                            self.skipped += end - start
                            copy_from = offset + end - self._seen
                    offset += take
                    self._seen += take
                    self._remaining -= take
                    if self._remaining == 0:
                        if state == "body":
                            self._state = "head"
                        else:
                            self._state = "chunk-size"
                    continue
                # a head or a line: look for its end, keeping (a bounded copy of) what is incomplete
                separator = b"\r\n\r\n" if state == "head" else b"\r\n"
                if state == "head" and not self._line and data.startswith(b"\r\n", offset):
                    offset += 2  # a stray CRLF between messages
                    continue
                if self._line:  # the end may straddle what was kept from earlier reads
                    held = len(self._line)
                    self._line += data[offset:offset + MAX_HEAD + len(separator)]
                    end = self._line.find(separator, max(0, held - len(separator) + 1))
                    if end < 0:
                        if len(self._line) > MAX_HEAD:
                            raise ProtocolError(f"HTTP head or chunk line longer than {MAX_HEAD} bytes")
                        break
                    end += len(separator)
                    line = bytes(self._line[:end])
                    offset += end - held
                    self._line.clear()
                else:
                    end = data.find(separator, offset, offset + MAX_HEAD + len(separator))
                    if end < 0:
                        if size - offset > MAX_HEAD:
                            raise ProtocolError(f"HTTP head or chunk line longer than {MAX_HEAD} bytes")
                        self._line += data[offset:]
                        break
                    end += len(separator)
                    line = data[offset:end]
                    offset = end
                if state == "head":
                    self._head(line.lstrip(b"\r\n"))
                else:
                    self._chunk_line(line)
        except ProtocolError as exc:
            logger.debug("body skipper: %s; copying everything from now on", exc)
            self.turn_off()
        if copy_from == 0:
            return [data]  # nothing skipped (a skip always moves copy_from)
        if copy_from < size:
            pieces.append(data[copy_from:])
        return pieces

    def turn_off(self) -> None:
        """Copy everything from now on (on the request side: the responses' too)."""
        self._state = "off"
        self._line = bytearray()
        if self.responses is not None:
            self.responses.turn_off()

    def _head(self, head: bytes) -> None:
        start, lines = header_lines(head)
        if self.request:
            method = start.split(b" ", 1)[0]
            self._methods.append(method)
            framing = request_body(method, lines)
        else:
            parts = start.split(b" ", 2)
            try:
                status = int(parts[1])
            except (IndexError, ValueError):
                raise ProtocolError("malformed status line") from None
            framing = response_body(self._methods[0] if self._methods else None, status, lines)
            if status >= 200 and self._methods:  # interim responses leave the request waiting
                self._methods.popleft()
        self._seen = 0
        self._skippable = framing.body in (Body.LENGTH, Body.CHUNKED) and not any(
            line.partition(b":")[0].strip().lower() == b"content-encoding" for line in lines)
        if framing.body is Body.UNTIL_CLOSE:
            raise ProtocolError("no longer framed as HTTP/1.1 messages")
        if framing.body is Body.LENGTH:
            self._state, self._remaining = "body", framing.length
        elif framing.body is Body.CHUNKED:
            self._state = "chunk-size"
        else:
            self._state = "head"

    def _chunk_line(self, line: bytes) -> None:
        text = line.strip()
        if self._state == "trailers":
            if not text:
                self._state = "head"
            return
        if not text:  # the CRLF that ends a chunk's data
            return
        size = chunk_size(text)
        if size == 0:
            self._state = "trailers"
        else:
            self._state, self._remaining = "chunk-data", size


class SkippingFeed:
    """A :class:`~oisp.proxy.relay.SkipFeed` of an HTTP/1.1 connection whose copies leave out the body bytes past
    ``cap`` (see the module docstring); everything else is passed on to ``inner`` as it comes."""

    def __init__(self, inner: SkipFeed, cap: int) -> None:
        self.inner = inner
        self._requests, self._responses = BodySkipper.pair(cap)

    @property
    def skipped(self) -> int:
        """Body bytes not copied so far, both directions."""
        return self._requests.skipped + self._responses.skipped

    def push(self, direction: Direction, data: bytes | None, now_ns: int) -> None:
        inner = self.inner
        if data is None:
            inner.push(direction, None, now_ns)
            return
        pieces = (self._requests if direction == "client" else self._responses).feed(data)
        if len(pieces) == 1 and pieces[0] is data:
            inner.push(direction, data, now_ns)
            return
        for piece in pieces:
            if isinstance(piece, int):
                inner.skip(direction, piece, now_ns)
            else:
                inner.push(direction, piece, now_ns)

    def skip(self, direction: Direction, count: int, now_ns: int) -> None:
        self.inner.skip(direction, count, now_ns)

    def finish(self, reason: str | None = None) -> None:
        if self.skipped:
            logger.debug("body bytes past the cap not copied to the decoder: %d", self.skipped)
        self.inner.finish(reason)

    async def run(self) -> None:
        await self.inner.run()


def skipping(feed: CopyFeed | None, alpn: str | None, cap: int) -> CopyFeed | None:
    """``feed`` leaving out body bytes past ``cap`` when it is an HTTP/1.1 connection's and can pass skips on;
    else ``feed`` itself."""
    if feed is None or alpn != "http/1.1" or not callable(getattr(feed, "skip", None)):
        return feed
    return SkippingFeed(cast(SkipFeed, feed), cap)
