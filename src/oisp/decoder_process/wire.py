"""The framing between the proxy and its decoder process.

Every message is a 17-byte header followed by its payload::

    kind (u8) | channel (u32) | payload length (u32) | timestamp ns (u64) | payload

``channel`` numbers a decoded connection (the proxy assigns them); ``timestamp`` is when the proxy read the
bytes (``time.monotonic_ns()``, which both processes share). Object payloads (a connection's facts, a report,
the summary) are pickled: both ends are the same oisp installation, and the socket pair is private to them.
"""

from __future__ import annotations

import enum
import pickle
import struct
from typing import Any

from oisp.errors import ProtocolError

__all__ = ["HEADER", "MAX_PAYLOAD", "FrameReader", "Kind", "dump_object", "header", "load_object"]

HEADER = struct.Struct("<BIIQ")
#: The largest payload a frame may carry (the relay's chunks are at most 64 KiB; events and pickles are small).
MAX_PAYLOAD = 64 * 1024 * 1024


class Kind(enum.IntEnum):
    """What a frame carries."""

    # proxy → decoder process
    #: A decoded connection starts: pickled ``(ConnectionInfo, alpn, body_cap)``.
    OPEN = 1
    #: Bytes the client sent.
    CLIENT_DATA = 2
    #: Bytes the server sent.
    SERVER_DATA = 3
    #: The client's direction ended.
    CLIENT_EOF = 4
    #: The server's direction ended.
    SERVER_EOF = 5
    #: The connection ended; payload: why it was cut short (UTF-8), empty when it ended normally.
    END = 6
    #: A pickled :class:`~oisp.proxy.report.ConnectionReport`.
    REPORT = 7
    #: The first frame: the pickled :class:`~oisp.decoder_process.worker.WorkerSettings`.
    SETTINGS = 8
    #: An activity event as JSON: observed in the proxy's process, which keeps the privileges the kernel's
    #: sources need, and processed (linked, redacted, written) by the decoder process's pipeline.
    ACTIVITY = 9
    #: The activity watermark (monotonic nanoseconds, 8 bytes big-endian): every activity event before it has
    #: been sent (and every copy the relay read before it).
    WATERMARK = 10
    #: Body bytes the client sent that were not copied (past the body cap): the count, 8 bytes big-endian.
    CLIENT_SKIP = 11
    #: Body bytes the server sent that were not copied, as :attr:`CLIENT_SKIP`.
    SERVER_SKIP = 12
    #: To the first decoder process (the one with the sinks): an event another one processed (``channel``: its
    #: shard), as it sent it (FORWARD).
    FORWARDED = 13
    #: To the first decoder process: the watermark shard ``channel`` reached (MARK), 8 bytes big-endian.
    SHARD_MARK = 14
    # decoder process → proxy
    #: Set up and listening; the payload is empty.
    READY = 16
    #: Could not start; payload: the pickled exception (or its text, when it cannot be pickled).
    FAILED = 17
    #: A processed event as JSON, for listeners in the proxy's process (the live view).
    EVENT = 18
    #: The pickled summary (pipeline statistics), sent last.
    SUMMARY = 19
    #: Events the pipeline dropped so far (a pickled int), sent when it changes (at most once a second).
    DROPS = 20
    #: From a decoder process without sinks (a shard after the first): a processed event as JSON, for the first.
    FORWARD = 21
    #: From a shard after the first: every event of the copies before the WATERMARK of this value (8 bytes
    #: big-endian) has been sent (FORWARD).
    MARK = 22
    #: The decoder process fell behind while a ``SCHED_IDLE`` task: the proxy makes it a task of this scheduling
    #: policy again (a pickled int), which its unprivileged user cannot do itself (:mod:`.priority`).
    PRIORITY = 23


def header(kind: Kind, channel: int, length: int, timestamp: int = 0) -> bytes:
    """The header of a frame."""
    return HEADER.pack(kind, channel, length, timestamp)


def dump_object(value: Any) -> bytes:
    """An object payload."""
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


def load_object(payload: bytes) -> Any:
    """An object payload back. Only ever called on frames from the other end of the private socket pair, which
    is the same oisp installation: nothing else can write to it."""
    return pickle.loads(payload)  # noqa: S301 - see above


class FrameReader:
    """Splits a byte stream into ``(kind, channel, timestamp, payload)`` frames.

    Frames that lie wholly within one chunk of received bytes are sliced out of it (one copy each); only a frame
    split across chunks is collected in a buffer, and only its own bytes are (never the rest of the chunk).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Kind, int, int, bytes]]:
        """Add received bytes; every frame now complete, in order. Raises ProtocolError on a corrupt stream."""
        size = HEADER.size
        frames: list[tuple[Kind, int, int, bytes]] = []
        offset = 0  # bytes of ``data`` used so far
        buffer = self._buffer  # at most one frame, begun in an earlier chunk
        if buffer:  # finish it: its header first, then its payload
            if len(buffer) < size:
                offset = min(size - len(buffer), len(data))
                buffer += data[:offset]
                if len(buffer) < size:
                    return frames
            kind, channel, timestamp, length = _parse_header(buffer, 0)
            take = min(size + length - len(buffer), len(data) - offset)
            buffer += data[offset:offset + take]
            offset += take
            if len(buffer) < size + length:
                return frames
            frames.append((kind, channel, timestamp, bytes(buffer[size:])))
            buffer.clear()
        end = len(data)
        while end - offset >= size:
            kind, channel, timestamp, length = _parse_header(data, offset)
            if end < offset + size + length:
                break
            frames.append((kind, channel, timestamp, bytes(data[offset + size:offset + size + length])))
            offset += size + length
        if offset < end:
            buffer += data[offset:]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def _parse_header(data: bytes | bytearray, offset: int) -> tuple[Kind, int, int, int]:
    """(kind, channel, timestamp, payload length) of the frame header at ``offset``; ProtocolError when corrupt."""
    kind, channel, length, timestamp = HEADER.unpack_from(data, offset)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"decoder channel: frame of {length} bytes (at most {MAX_PAYLOAD})")
    try:
        return Kind(kind), channel, timestamp, length
    except ValueError:
        raise ProtocolError(f"decoder channel: unknown frame kind {kind}") from None
