"""Hypothesis inputs for the fuzz targets: arbitrary bytes, and mutations of each target's seeds (bytes
replaced, inserted, deleted, truncated), so that generated inputs get past the parsers' first checks."""

from __future__ import annotations

from hypothesis import strategies as st
from tests.fuzz.targets import SEEDS

_BOUNDARIES = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x00\x01")


@st.composite
def _mutated(draw: st.DrawFn, target: str) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS[target])))
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(("replace", "insert", "delete", "truncate", "interesting")))
        if action == "replace":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(max_size=16))
        elif action == "delete":
            del data[position:position + draw(st.integers(1, 16))]
        elif action == "truncate":
            del data[position:]
        else:  # a boundary value where a length or a flag may be
            data[position:position + 4] = draw(st.sampled_from(_BOUNDARIES))
    return bytes(data)


def inputs(target: str) -> st.SearchStrategy[bytes]:
    """What the target is fed: mostly mutated seeds, sometimes arbitrary bytes."""
    return st.one_of(_mutated(target), st.binary(max_size=2048))
