"""Incremental, bounded removal of HTTP content codings (``Content-Encoding``) from a body stream.

:class:`ContentDecoder` is fed body bytes as they arrive (after transfer decoding) and returns the decoded bytes.
It never raises on bad input and never produces more than its ``limit`` of output, so a decompression bomb
costs at most ``limit`` bytes of memory: each coding is decoded with an output bound (zlib ``max_length``,
brotli ``output_buffer_limit``, a zstd writer that stops the decompressor) instead of inflating and trimming.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from typing import IO, Final, Protocol, cast

import brotli
import zstandard

from oisp.errors import ConfigurationError

__all__ = ["SUPPORTED_CODINGS", "ContentDecoder", "parse_content_codings"]

logger = logging.getLogger(__name__)

#: Content codings :class:`ContentDecoder` removes (``identity`` is accepted and ignored).
SUPPORTED_CODINGS: Final = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})

#: RFC 9659: decoders of the ``zstd`` content coding need not accept windows larger than 8 MiB; refusing larger
#: ones keeps a hostile server from making the decoder allocate a huge window.
_ZSTD_MAX_WINDOW: Final = 8 * 1024 * 1024

_DECODE_ERRORS: Final = (zlib.error, brotli.error, zstandard.ZstdError)


def parse_content_codings(value: str | None) -> list[str]:
    """The codings of a ``Content-Encoding`` value, in the order they were applied, lower-cased.

    ``identity`` and empty list members are dropped; ``x-gzip`` is kept as written (it decodes as gzip).
    """
    if not value:
        return []
    codings = []
    for item in value.split(","):
        coding = item.strip().lower()
        if coding and coding != "identity":
            codings.append(coding)
    return codings


class _Stage(Protocol):
    """One content coding being removed."""

    name: str

    def feed(self, data: bytes, budget: int) -> bytes:
        """Decode ``data``; return at most ``budget`` (>= 1) bytes. Input past the budget may be dropped."""
        ...

    def incomplete(self) -> bool:
        """True when input was seen but the coding's stream did not reach its end."""
        ...


class _ZlibStage:
    """gzip (one or more members, zero padding tolerated) or deflate (zlib-wrapped or raw, detected)."""

    def __init__(self, name: str, *, gzip: bool) -> None:
        self.name = name
        self._gzip = gzip
        self._obj: zlib._Decompress | None = zlib.decompressobj(31) if gzip else None
        # deflate: the first bytes, kept until there are two to tell zlib-wrapped from raw deflate.
        self._sniff = b""
        self._seen_input = False
        self._ignoring_trailer = False

    def feed(self, data: bytes, budget: int) -> bytes:
        if not data or self._ignoring_trailer:
            return b""
        self._seen_input = True
        if self._obj is None:
            data = self._sniff + data
            if len(data) < 2:
                self._sniff = data
                return b""
            self._sniff = b""
            self._obj = zlib.decompressobj(15 if _is_zlib_header(data) else -15)
        out: list[bytes] = []
        while data and budget > 0:
            if self._obj.eof:
                rest = data.lstrip(b"\0") if self._gzip else data
                if not rest:
                    break
                if not self._gzip or rest[:1] != b"\x1f":
                    # Bytes after the end of the stream: browsers ignore them, and so do we.
                    logger.debug("ignoring %d bytes after the end of a %s stream", len(rest), self.name)
                    self._ignoring_trailer = True
                    break
                self._obj = zlib.decompressobj(31)
                data = rest
            chunk = self._obj.decompress(data, budget)
            budget -= len(chunk)
            out.append(chunk)
            data = self._obj.unused_data if self._obj.eof else self._obj.unconsumed_tail
        return b"".join(out)

    def incomplete(self) -> bool:
        return self._seen_input and (self._obj is None or not self._obj.eof)


def _is_zlib_header(data: bytes) -> bool:
    cmf, flg = data[0], data[1]
    return cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0


class _BrotliStage:
    name = "br"

    def __init__(self) -> None:
        self._obj = brotli.Decompressor()
        self._seen_input = False

    def feed(self, data: bytes, budget: int) -> bytes:
        if not data:
            return b""
        self._seen_input = True
        # Returns early only when the output limit is reached, and then the decoder stops for good.
        out: bytes = self._obj.process(data, output_buffer_limit=budget)
        return out[:budget] if len(out) > budget else out

    def incomplete(self) -> bool:
        return self._seen_input and not self._obj.is_finished()


class _OutputFull(Exception):
    """Raised by :class:`_ZstdOutput` to stop the zstd decompressor once the budget is spent."""


class _ZstdOutput:
    """The file-like sink a zstd stream writer writes decoded data to; refuses data past the budget."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.budget = 0

    def write(self, data: bytes) -> int:
        if len(data) >= self.budget:
            self.chunks.append(bytes(data[: self.budget]))
            self.budget = 0
            raise _OutputFull
        self.chunks.append(bytes(data))
        self.budget -= len(data)
        return len(data)


class _ZstdStage:
    """zstd, one or more frames. Whether the last frame was complete is not checked (the binding has no way
    to ask a stream writer); transfer framing still reveals a truncated body."""

    name = "zstd"

    def __init__(self) -> None:
        self._output = _ZstdOutput()
        dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        self._writer = dctx.stream_writer(cast(IO[bytes], self._output), write_size=64 * 1024, closefd=False)

    def feed(self, data: bytes, budget: int) -> bytes:
        if not data:
            return b""
        self._output.budget = budget
        with contextlib.suppress(_OutputFull):
            self._writer.write(data)
        chunks = self._output.chunks
        self._output.chunks = []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def incomplete(self) -> bool:
        return False


def _make_stage(coding: str) -> _Stage:
    if coding in ("gzip", "x-gzip"):
        return _ZlibStage(coding, gzip=True)
    if coding == "deflate":
        return _ZlibStage(coding, gzip=False)
    if coding == "br":
        return _BrotliStage()
    return _ZstdStage()


class ContentDecoder:
    """Removes the content codings of one message body, incrementally, with bounded output.

    ``content_encoding`` is the ``Content-Encoding`` field value (several field lines joined with ``", "``);
    codings are removed in reverse order of application, so ``gzip, br`` is br-decoded, then gunzipped.

    - At most ``limit`` decoded bytes are ever returned; when there is more, :attr:`truncated` is set and the
      rest of the input is ignored without being decoded.
    - Corrupt input stops decoding for good: :attr:`error` says why; what was decoded before stays valid.
    - An unsupported coding (``compress``, anything unknown) disables decoding: the body is returned as sent
      (still capped) and :attr:`unsupported` names the codings.

    Intermediate results of stacked codings are bounded by ``limit`` too, so a bomb hidden under a second
    coding is stopped as early as one under the first.
    """

    def __init__(self, content_encoding: str | None, limit: int) -> None:
        if limit < 0:
            raise ConfigurationError(f"ContentDecoder limit must be >= 0 bytes, got {limit}")
        codings = parse_content_codings(content_encoding)
        unknown = [coding for coding in codings if coding not in SUPPORTED_CODINGS]
        #: The content codings that could not be removed, comma-separated; None when all are supported.
        self.unsupported: str | None = ", ".join(unknown) if unknown else None
        #: The codings being removed, in the order they are undone.
        self.codings: tuple[str, ...] = () if unknown else tuple(reversed(codings))
        #: Why decoding stopped early (corrupt or incomplete coded data); None if it did not.
        self.error: str | None = None
        #: True when decoded output reached ``limit`` and the rest was dropped.
        self.truncated = False
        self._stages = [_make_stage(coding) for coding in self.codings]
        self._stage_output = [0] * len(self._stages)
        self._limit = limit
        self._produced = 0
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once no more output will come: truncated, corrupt, or finished."""
        return self._stopped

    @property
    def produced(self) -> int:
        """Decoded bytes returned so far."""
        return self._produced

    def decode(self, data: bytes | bytearray | memoryview) -> bytes:
        """Decode the next piece of the coded body; returns the newly decoded bytes (possibly empty)."""
        if self._stopped or not data:
            return b""
        chunk = data if type(data) is bytes else bytes(data)
        stage_name = ""
        try:
            for index, stage in enumerate(self._stages):
                stage_name = stage.name
                chunk = stage.feed(chunk, self._limit + 1 - self._stage_output[index])
                self._stage_output[index] += len(chunk)
                excess = self._stage_output[index] - self._limit
                if excess > 0:
                    chunk = chunk[: len(chunk) - excess]
                    self._stage_output[index] = self._limit
                    self._truncate()
                if not chunk:
                    return b""
        except _DECODE_ERRORS as exc:
            self.error = f"corrupt {stage_name} data: {exc}"
            self._stopped = True
            return b""
        room = self._limit - self._produced
        if len(chunk) > room:
            chunk = chunk[:room]
            self._truncate()
        self._produced += len(chunk)
        return chunk

    def finish(self) -> None:
        """Mark the end of the body; sets :attr:`error` if a coded stream was cut short."""
        if self._stopped:
            return
        self._stopped = True
        for stage in self._stages:
            if stage.incomplete():
                self.error = f"{stage.name} data ended before the end of its stream"
                return

    def _truncate(self) -> None:
        self.truncated = True
        self._stopped = True
