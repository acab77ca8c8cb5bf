"""Helpers that feed one stream to a fresh decoder in different chunkings, for the split-invariance tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import strategies as st

from oisp.framing import StreamDecoder

DecoderFactory = Callable[[], StreamDecoder[Any]]


def decode_whole(make: DecoderFactory, data: bytes) -> list[Any]:
    """Every item of ``data`` fed in one piece, then closed."""
    decoder = make()
    return decoder.feed(data) + decoder.close()


def decode_split(make: DecoderFactory, data: bytes, cuts: Sequence[int]) -> list[Any]:
    """Every item of ``data`` fed in pieces cut at the sorted offsets ``cuts``, then closed."""
    decoder = make()
    items: list[Any] = []
    start = 0
    for cut in [*cuts, len(data)]:
        items += decoder.feed(data[start:cut])
        start = cut
    return items + decoder.close()


def decode_bytewise(make: DecoderFactory, data: bytes) -> list[Any]:
    """Every item of ``data`` fed one byte at a time, then closed."""
    return decode_split(make, data, range(1, len(data)))


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[int]:
    """Sorted cut offsets into ``data``: anywhere from one piece to one byte per piece."""
    if not data:
        return []
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=min(len(data), 64)))
    return sorted(cuts)


def assert_split_invariant(make: DecoderFactory, data: bytes) -> list[Any]:
    """Check that cutting ``data`` in two at every offset, or byte by byte, gives the items of one piece."""
    whole = decode_whole(make, data)
    for cut in range(len(data) + 1):
        assert decode_split(make, data, [cut]) == whole, f"cut at {cut}"
    assert decode_bytewise(make, data) == whole
    return whole
