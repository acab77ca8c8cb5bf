"""ClientHello parsing: real hellos from Python's ssl, hand-built edge cases, and hostile input."""

from __future__ import annotations

import ssl
import struct
from collections.abc import Sequence

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tests.tls.loopback import client_hello

from oisp.errors import ProtocolError
from oisp.tls import ClientHello, looks_like_tls, parse_client_hello
from oisp.tls.clienthello import MAX_CLIENT_HELLO_SIZE

TLS13 = 0x0304
TLS12 = 0x0303

# Captured once per session: each capture is a real handshake start by the ssl module.
HELLO = client_hello("api.openai.com", ("h2", "http/1.1"))
HELLO_NO_SNI = client_hello(None, None)
HELLO_IP = client_hello("127.0.0.1", ("http/1.1",))
HELLO_TLS12 = client_hello("api.anthropic.com", ("h2",), maximum_version=ssl.TLSVersion.TLSv1_2)
REAL_HELLOS = [HELLO, HELLO_NO_SNI, HELLO_IP, HELLO_TLS12]


def records(handshake: bytes, sizes: Sequence[int], *, version: bytes = b"\x03\x01") -> bytes:
    """Wrap ``handshake`` bytes in handshake records of the given payload sizes (the rest in a last record)."""
    out = b""
    pos = 0
    for size in [*sizes, len(handshake)]:
        chunk = handshake[pos : pos + size]
        if not chunk:
            break
        out += b"\x16" + version + struct.pack(">H", len(chunk)) + chunk
        pos += len(chunk)
    return out


def handshake_of(hello: bytes) -> bytes:
    """The handshake message inside a single-record hello."""
    assert hello[0] == 0x16
    length = struct.unpack(">H", hello[3:5])[0]
    assert len(hello) == 5 + length
    return hello[5:]


def vector(data: bytes, length_size: int) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def extension(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">H", ext_type) + vector(data, 2)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    return extension(0, vector(b"".join(bytes([name_type]) + vector(name, 2) for name in names), 2))


def alpn(*protocols: bytes) -> bytes:
    return extension(16, vector(b"".join(vector(protocol, 1) for protocol in protocols), 2))


def build_hello(
    extensions: bytes | None = b"",
    *,
    suites: bytes = b"\x13\x01\xc0\x2f",
    session_id: bytes = b"",
    compression: bytes = b"\x00",
    version: int = TLS12,
    trailing: bytes = b"",
) -> bytes:
    """A hand-built ClientHello record; ``extensions=None`` leaves the extensions block out entirely."""
    body = (
        struct.pack(">H", version)
        + bytes(32)
        + vector(session_id, 1)
        + vector(suites, 2)
        + vector(compression, 1)
        + (vector(extensions, 2) if extensions is not None else b"")
        + trailing
    )
    return records(b"\x01" + vector(body, 3), [])


# -- real ClientHellos ---------------------------------------------------------------------------------------


def test_real_hello_with_sni_and_alpn() -> None:
    hello = parse_client_hello(HELLO)
    assert hello is not None
    assert hello.sni == "api.openai.com"
    assert hello.alpn_protocols == ("h2", "http/1.1")
    assert hello.legacy_version == TLS12
    assert TLS13 in hello.supported_versions
    assert 0x1301 in hello.cipher_suites  # TLS_AES_128_GCM_SHA256
    assert hello.record_bytes == len(HELLO)


def test_real_hello_without_sni_or_alpn() -> None:
    hello = parse_client_hello(HELLO_NO_SNI)
    assert hello is not None
    assert hello.sni is None
    assert hello.alpn_protocols == ()


def test_ssl_sends_no_sni_for_an_ip_address() -> None:
    hello = parse_client_hello(HELLO_IP)
    assert hello is not None
    assert hello.sni is None
    assert hello.alpn_protocols == ("http/1.1",)


def test_real_tls12_only_hello_has_no_supported_versions() -> None:
    hello = parse_client_hello(HELLO_TLS12)
    assert hello is not None
    assert hello.sni == "api.anthropic.com"
    assert hello.supported_versions == ()
    assert hello.legacy_version == TLS12


@pytest.mark.parametrize("hello", REAL_HELLOS)
def test_every_truncation_needs_more_bytes_then_the_whole_parses(hello: bytes) -> None:
    for cut in range(len(hello)):
        assert parse_client_hello(hello[:cut]) is None, cut
    assert parse_client_hello(hello) is not None


@pytest.mark.parametrize("hello", REAL_HELLOS)
def test_bytes_after_the_hello_are_not_part_of_it(hello: bytes) -> None:
    alone = parse_client_hello(hello)
    followed = parse_client_hello(hello + b"\x17\x03\x03\x00\x05early")
    assert followed == alone
    assert followed is not None
    assert followed.record_bytes == len(hello)


def test_hello_split_over_several_records() -> None:
    handshake = handshake_of(HELLO)
    split = records(handshake, [1, 3, 50, 100])  # the 4-byte handshake header itself is split
    hello = parse_client_hello(split)
    assert hello == attrs_evolve(parse_client_hello(HELLO), record_bytes=len(split))
    for cut in range(len(split)):
        assert parse_client_hello(split[:cut]) is None


def attrs_evolve(hello: ClientHello | None, **changes: object) -> ClientHello:
    import attrs

    assert hello is not None
    return attrs.evolve(hello, **changes)  # type: ignore[arg-type]


@given(sizes=st.lists(st.integers(min_value=1, max_value=700), max_size=12), cut=st.integers(min_value=0))
def test_any_record_split_and_any_truncation_agree_with_the_single_record(sizes: list[int], cut: int) -> None:
    split = records(handshake_of(HELLO), sizes)
    expected = attrs_evolve(parse_client_hello(HELLO), record_bytes=len(split))
    assert parse_client_hello(split) == expected
    assert parse_client_hello(split + b"\x16\x03") == expected
    assert parse_client_hello(split[: cut % len(split)]) is None


# -- hand-built hellos -----------------------------------------------------------------------------------------


def test_hello_without_extensions_parses() -> None:
    hello = parse_client_hello(build_hello(None, version=0x0301))
    assert hello == ClientHello(
        sni=None,
        alpn_protocols=(),
        legacy_version=0x0301,
        supported_versions=(),
        cipher_suites=(0x1301, 0xC02F),
        record_bytes=len(build_hello(None)),
    )


def test_unknown_sni_name_types_are_skipped() -> None:
    hello = parse_client_hello(build_hello(sni(b"ignored", name_type=7)))
    assert hello is not None
    assert hello.sni is None


def test_alpn_names_are_decoded_losslessly() -> None:
    hello = parse_client_hello(build_hello(alpn(b"h2", b"\xff\x00odd")))
    assert hello is not None
    assert hello.alpn_protocols == ("h2", "\xff\x00odd")
    assert hello.alpn_protocols[1].encode("latin-1") == b"\xff\x00odd"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\nHost: api.openai.com\r\n\r\n", "plaintext, e.g. HTTP"),
        (b"\x80\x2e\x01\x00\x02", "SSLv2"),
        (b"\x15\x03\x03\x00\x02\x02\x28", "not a TLS handshake"),
        (b"\x16\x02\x00", "major version is 2"),
        (b"\x16\x03\x01\x00\x00", "empty payload"),
        (b"\x16\x03\x01\x40\x01", "over the 16384-byte limit"),
        (b"\x16\x03\x03\x00\x04\x02\x00\x00\x00", "type 2"),
        (b"\x16\x03\x01\x00\x04\x01\x01\x00\x01", f"more than the {MAX_CLIENT_HELLO_SIZE} accepted"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "more than"),
        (records(handshake_of(HELLO)[:10], []) + b"\x14\x03\x03\x00\x01\x01", "content type 20 arrived before"),
        (build_hello(sni(b"api.openai.com") + sni(b"x.com")), "extension 0 appears twice"),
        (build_hello(sni("bücher.de".encode())), "not ASCII"),
        (build_hello(sni(b"")), "empty host_name"),
        (build_hello(sni(b"a.com", b"b.com")), "more than one host_name"),
        (build_hello(extension(0, b"")), "length of server_name_list needs 2 bytes"),
        (build_hello(extension(16, vector(b"", 2))), "empty protocol list"),
        (build_hello(alpn(b"")), "empty protocol name"),
        (build_hello(extension(16, vector(b"\x05h2", 2))), "protocol name needs 5 bytes"),
        (build_hello(extension(43, b"\x03\x03\x04\x03")), "odd|even"),
        (build_hello(extension(43, b"\x00")), "need an even >0"),
        (build_hello(extension(0, vector(b"\x00\x00\x01a", 2) + b"x")), "trailing"),
        (build_hello(suites=b"\x13"), "cipher_suites has 1 bytes"),
        (build_hello(suites=b""), "cipher_suites has 0 bytes"),
        (build_hello(compression=b""), "no compression methods"),
        (build_hello(session_id=bytes(33)), "legacy_session_id is longer than 32"),
        (build_hello(b"", trailing=b"\x00"), "trailing"),
        (build_hello(b"\x00\x00\x00\x10"), "extension 0 needs 16 bytes"),
        (build_hello(alpn(b"h2") + b"\x00"), "extension type needs 2 bytes but only 1 are left"),
        (build_hello(alpn(b"h2") + b"\x00\x2b\x00"), "length of extension 43 needs 2 bytes but only 1 are left"),
        (records(b"\x01\x00\x00\x02\x03\x03", []), "random needs 32 bytes"),
    ],
)
def test_what_is_not_a_client_hello_is_a_protocol_error(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_client_hello(data)


def test_http_is_rejected_from_the_first_byte() -> None:
    with pytest.raises(ProtocolError, match="plaintext"):
        parse_client_hello(b"G")


# -- looks_like_tls -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hello", REAL_HELLOS)
def test_looks_like_tls_for_every_prefix_of_a_real_hello(hello: bytes) -> None:
    assert all(looks_like_tls(hello[:cut]) for cut in range(1, 12))


@pytest.mark.parametrize(
    "data",
    [b"", b"GET / HTTP/1.1\r\n", b"PRI * HTTP/2.0", b"\x16\x02", b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x01\x00\x02"],
)
def test_does_not_look_like_tls(data: bytes) -> None:
    assert not looks_like_tls(data)


# -- hostile input ----------------------------------------------------------------------------------------------


def parse_or_error(data: bytes) -> ClientHello | ProtocolError | None:
    try:
        return parse_client_hello(data)
    except ProtocolError as error:
        return error


@given(st.binary(max_size=2048))
@example(b"\x16\x03\x01\x00\x04\x01\x00\x00\x00")
@example(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03")
def test_random_bytes_give_a_value_none_or_protocol_error(data: bytes) -> None:
    result = parse_or_error(data)  # anything else (IndexError, struct.error, ...) fails the test
    if data and not looks_like_tls(data):
        assert isinstance(result, ProtocolError)


@given(st.binary(max_size=2048))
def test_random_bytes_behind_a_handshake_header_never_crash(body: bytes) -> None:
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    parse_or_error(records(handshake, [700, 700]))


@given(
    hello=st.sampled_from(REAL_HELLOS),
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), min_size=1, max_size=4
    ),
)
def test_corrupted_real_hellos_never_crash(hello: bytes, flips: list[tuple[int, int]]) -> None:
    corrupted = bytearray(hello)
    for position, mask in flips:
        corrupted[position % len(corrupted)] ^= mask
    result = parse_or_error(bytes(corrupted))
    if isinstance(result, ClientHello):
        assert result.record_bytes <= len(corrupted)


@given(hello=st.sampled_from(REAL_HELLOS), cut=st.integers(min_value=0))
def test_truncated_and_extended_real_hellos_agree(hello: bytes, cut: int) -> None:
    whole = parse_client_hello(hello)
    assert parse_client_hello(hello[: cut % len(hello)]) is None
    assert parse_client_hello(hello + bytes(cut % 64)) == whole
