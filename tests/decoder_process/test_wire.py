"""The framing between the proxy and its decoder process."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oisp.decoder_process.wire import HEADER, MAX_PAYLOAD, FrameReader, Kind, header
from oisp.errors import ProtocolError

FRAMES = [(Kind.OPEN, 1, 0, b"\x80\x05open"), (Kind.CLIENT_DATA, 1, 123456789, b"POST / HTTP/1.1\r\n\r\n"),
          (Kind.CLIENT_EOF, 1, 5, b""), (Kind.SERVER_DATA, 2, 2**63, b"x" * 70000), (Kind.END, 1, 0, b"reset")]
STREAM = b"".join(header(kind, channel, len(payload), ts) + payload for kind, channel, ts, payload in FRAMES)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_frames_come_out_whole_and_in_order_however_the_stream_is_cut(cuts: list[int]) -> None:
    reader = FrameReader()
    points = [0, *sorted(cuts), len(STREAM)]
    out = []
    for start, end in itertools.pairwise(points):
        out.extend(reader.feed(STREAM[start:end]))
    assert out == FRAMES
    assert reader.pending == 0


def test_a_half_frame_is_held_back() -> None:
    reader = FrameReader()
    assert list(reader.feed(STREAM[:HEADER.size + 3])) == []
    assert reader.pending == HEADER.size + 3


@pytest.mark.parametrize(("raw", "message"), [
    (HEADER.pack(99, 1, 0, 0), "unknown frame kind 99"),
    (HEADER.pack(Kind.CLIENT_DATA, 1, MAX_PAYLOAD + 1, 0), "at most"),
])
def test_a_corrupt_stream_is_a_clear_error(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        list(FrameReader().feed(raw))
