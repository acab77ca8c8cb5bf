"""Sans-io parsing of a TLS ClientHello: the SNI, ALPN and versions a client offers before any key exchange.

The proxy peeks at the first bytes of a connection, feeds everything it has read so far to
:func:`parse_client_hello` and reads more while the answer is ``None``. Nothing here touches a socket.

Only what the proxy needs is decoded; the ClientHello is validated as far as its length fields go (every
vector must fit inside its parent exactly), so hostile input yields :class:`~oisp.errors.ProtocolError`, never
an ``IndexError`` or a huge allocation.
"""

from __future__ import annotations

import struct

import attrs

from oisp.errors import ProtocolError

__all__ = ["MAX_CLIENT_HELLO_SIZE", "ClientHello", "looks_like_tls", "parse_client_hello"]

#: Largest ClientHello handshake message accepted (bytes after the 4-byte handshake header). Real ones, even
#: with post-quantum key shares, are under 2 KiB; the cap bounds how much the proxy buffers before giving up.
MAX_CLIENT_HELLO_SIZE = 64 * 1024

_RECORD_HEADER_SIZE = 5
_MAX_RECORD_PAYLOAD = 2**14  # RFC 8446 5.1: TLSPlaintext.length MUST NOT exceed 2^14
_CONTENT_TYPE_HANDSHAKE = 0x16
_HANDSHAKE_CLIENT_HELLO = 0x01
_HANDSHAKE_HEADER_SIZE = 4

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_SNI_HOST_NAME = 0


@attrs.frozen
class ClientHello:
    """What a TLS client offered in its ClientHello: enough to pick a certificate and mirror the offer upstream.

    ``record_bytes`` is how many bytes of the input the TLS records carrying the ClientHello took, counting
    record headers; the proxy replays exactly those bytes upstream (or hands them to its TLS layer) and keeps
    any bytes after them.
    """

    #: The ``host_name`` from the server_name extension exactly as sent (ASCII, case preserved), or ``None``.
    sni: str | None
    #: ALPN protocol names in the client's order, decoded as Latin-1 (lossless; real names are ASCII).
    alpn_protocols: tuple[str, ...]
    #: ``ClientHello.legacy_version``, e.g. ``0x0303`` (TLS 1.2, also sent by TLS 1.3 clients).
    legacy_version: int
    #: Versions from the supported_versions extension in the client's order (GREASE values included);
    #: empty when the extension is absent (a client that speaks at most TLS 1.2).
    supported_versions: tuple[int, ...]
    #: Cipher suite code points in the client's order (GREASE values included).
    cipher_suites: tuple[int, ...]
    #: Bytes of input, record headers included, taken by the records that carry the ClientHello.
    record_bytes: int


def looks_like_tls(first_bytes: bytes) -> bool:
    """Tell whether the first bytes of a connection can be the start of a TLS ClientHello.

    A cheap check for sniffing TLS versus plaintext on a connection: it is true exactly when
    :func:`parse_client_hello` would not reject these bytes from their record and handshake headers alone.
    Empty input gives ``False`` (there is nothing to decide on yet).
    """
    if not first_bytes:
        return False
    try:
        _check_record_header(first_bytes[:_RECORD_HEADER_SIZE], first=True)
        if len(first_bytes) > _RECORD_HEADER_SIZE:
            _check_handshake_header(first_bytes[_RECORD_HEADER_SIZE : _RECORD_HEADER_SIZE + 4])
    except ProtocolError:
        return False
    return True


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data``, the bytes a client has sent on a connection so far.

    Returns ``None`` while more bytes are needed: the ClientHello may be split over several TLS records and
    each record over several reads, so call again with all bytes received so far. Bytes after the records
    carrying the ClientHello are ignored (see :attr:`ClientHello.record_bytes`).

    Raises :class:`~oisp.errors.ProtocolError` as soon as the bytes cannot be a TLS ClientHello: plaintext
    such as HTTP, an SSLv2-style hello, a record that is not a handshake, a handshake message that is not a
    ClientHello, a record or message longer than TLS allows (or than :data:`MAX_CLIENT_HELLO_SIZE`), or length
    fields that do not add up.
    """
    message = bytearray()
    offset = 0
    message_size: int | None = None  # handshake header included, known once its 4 bytes are in
    while message_size is None or len(message) < message_size:
        header = data[offset : offset + _RECORD_HEADER_SIZE]
        _check_record_header(header, first=offset == 0)
        if len(header) < _RECORD_HEADER_SIZE:
            return None
        payload_size = int.from_bytes(header[3:5], "big")
        payload = data[offset + _RECORD_HEADER_SIZE : offset + _RECORD_HEADER_SIZE + payload_size]
        message += payload
        if message_size is None:
            _check_handshake_header(message[:_HANDSHAKE_HEADER_SIZE])
            if len(message) >= _HANDSHAKE_HEADER_SIZE:
                message_size = _HANDSHAKE_HEADER_SIZE + int.from_bytes(message[1:4], "big")
        if len(payload) < payload_size:
            return None
        offset += _RECORD_HEADER_SIZE + payload_size
    return _parse_body(bytes(message[_HANDSHAKE_HEADER_SIZE:message_size]), record_bytes=offset)


def _check_record_header(header: bytes, *, first: bool) -> None:
    """Reject a (possibly incomplete) record header that cannot carry a ClientHello."""
    if not header:
        return
    content_type = header[0]
    if content_type != _CONTENT_TYPE_HANDSHAKE:
        if first:
            raise ProtocolError(f"not a TLS handshake: the connection starts with {_describe(header)}")
        raise ProtocolError(
            f"TLS record of content type {content_type} arrived before the ClientHello was complete "
            "(expected only handshake records, type 22)"
        )
    if len(header) >= 2 and header[1] != 0x03:
        raise ProtocolError(
            f"not a TLS record: protocol major version is {header[1]}, TLS always uses 3 (record header {header.hex()})"
        )
    if len(header) >= _RECORD_HEADER_SIZE:
        size = int.from_bytes(header[3:5], "big")
        if size == 0:
            raise ProtocolError("TLS handshake record with an empty payload (not allowed by RFC 8446 5.1)")
        if size > _MAX_RECORD_PAYLOAD:
            raise ProtocolError(f"TLS record payload of {size} bytes is over the 16384-byte limit")


def _check_handshake_header(header: bytes | bytearray) -> None:
    """Reject a (possibly incomplete) handshake header that is not a ClientHello of acceptable size."""
    if not header:
        return
    if header[0] != _HANDSHAKE_CLIENT_HELLO:
        raise ProtocolError(
            f"first TLS handshake message has type {header[0]}, a client must start with ClientHello (type 1)"
        )
    if len(header) >= _HANDSHAKE_HEADER_SIZE:
        size = int.from_bytes(header[1:4], "big")
        if size > MAX_CLIENT_HELLO_SIZE:
            raise ProtocolError(f"ClientHello claims {size} bytes, more than the {MAX_CLIENT_HELLO_SIZE} accepted")


def _describe(header: bytes) -> str:
    """Say what the first bytes of a non-TLS connection look like, for an error message."""
    if header[0] & 0x80:
        return f"{header.hex()} (an SSLv2-style hello or binary data; SSLv2 hellos are not supported)"
    if all(0x20 <= byte < 0x7F or byte in b"\r\n\t" for byte in header):
        return f"{header!r} (plaintext, e.g. HTTP, where a TLS ClientHello was expected)"
    return f"{header.hex()} (expected 16 03: a TLS handshake record)"


class _Reader:
    """Reads big-endian integers and length-prefixed vectors, raising ProtocolError instead of overrunning.

    A ClientHello is parsed on every new connection: the field names for error messages are put together only
    when there is an error."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _short(self, size: int, field: str, number: int | None = None) -> ProtocolError:
        name = field if number is None else f"{field} {number}"
        return ProtocolError(f"malformed {self._what}: {name} needs {size} bytes but only {self.remaining} are left")

    def take(self, size: int, field: str) -> bytes:
        pos = self._pos
        if size > len(self._data) - pos:
            raise self._short(size, field)
        self._pos = pos + size
        return self._data[pos : pos + size]

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str, number: int | None = None) -> bytes:
        """A vector whose length takes ``length_size`` bytes; ``number`` goes after ``field`` in an error."""
        data, pos = self._data, self._pos
        if length_size > len(data) - pos:
            raise self._short(length_size, "length of " + field, number)
        end = pos + length_size
        size = int.from_bytes(data[pos:end], "big")
        if size > len(data) - end:
            self._pos = end
            raise self._short(size, field, number)
        self._pos = end + size
        return data[end : end + size]

    def expect_end(self) -> None:
        if self.remaining:
            raise ProtocolError(f"malformed {self._what}: {self.remaining} unexpected trailing bytes")


def _parse_body(body: bytes, *, record_bytes: int) -> ClientHello:
    """Decode a complete ClientHello message body (after the handshake header)."""
    reader = _Reader(body, "ClientHello")
    legacy_version = reader.uint(2, "legacy_version")
    reader.take(32, "random")
    if len(reader.vector(1, "legacy_session_id")) > 32:
        raise ProtocolError("malformed ClientHello: legacy_session_id is longer than 32 bytes")
    suites = reader.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise ProtocolError(f"malformed ClientHello: cipher_suites has {len(suites)} bytes, need an even >0")
    if not reader.vector(1, "legacy_compression_methods"):
        raise ProtocolError("malformed ClientHello: no compression methods (at least 'null' is required)")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if reader.remaining:  # a hello without extensions (pre-TLS 1.3 clients) simply ends here
        extensions = _Reader(reader.vector(2, "extensions"), "ClientHello extensions")
        reader.expect_end()
        seen: set[int] = set()
        data, pos, end = extensions._data, 0, len(extensions._data)
        while pos < end:
            # The common case read in place (a dozen or more extensions on every new connection); a truncated
            # one goes through the reader, which says what is missing.
            if end - pos >= 4 and end - pos - 4 >= (size := (data[pos + 2] << 8) | data[pos + 3]):
                ext_type = (data[pos] << 8) | data[pos + 1]
                ext_data = data[pos + 4 : pos + 4 + size]
                pos += 4 + size
            else:
                extensions._pos = pos
                ext_type = extensions.uint(2, "extension type")
                extensions.vector(2, "extension", ext_type)
                raise AssertionError("unreachable: the reader raises for a truncated extension")
            if ext_type in seen:
                raise ProtocolError(f"malformed ClientHello: extension {ext_type} appears twice")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                sni = _parse_server_name(ext_data)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(ext_data)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(ext_data)
    return ClientHello(
        sni=sni,
        alpn_protocols=alpn,
        legacy_version=legacy_version,
        supported_versions=versions,
        cipher_suites=struct.unpack(f">{len(suites) // 2}H", suites),
        record_bytes=record_bytes,
    )


def _parse_server_name(data: bytes) -> str | None:
    outer = _Reader(data, "server_name extension")
    names = _Reader(outer.vector(2, "server_name_list"), "server_name extension")
    outer.expect_end()
    host: str | None = None
    while names.remaining:
        name_type = names.uint(1, "name_type")
        name = names.vector(2, "host_name")
        if name_type != _SNI_HOST_NAME:
            continue  # RFC 6066 allows other name types; none are defined, skip rather than guess
        if host is not None:
            raise ProtocolError("malformed server_name extension: more than one host_name")
        if not name:
            raise ProtocolError("malformed server_name extension: empty host_name")
        try:
            host = name.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(
                f"malformed server_name extension: host_name {name!r} is not ASCII (IDNs are sent as xn--)"
            ) from None
    return host


def _parse_alpn(data: bytes) -> tuple[str, ...]:
    outer = _Reader(data, "ALPN extension")
    names = _Reader(outer.vector(2, "protocol_name_list"), "ALPN extension")
    outer.expect_end()
    protocols: list[str] = []
    while names.remaining:
        name = names.vector(1, "protocol name")
        if not name:
            raise ProtocolError("malformed ALPN extension: empty protocol name")
        protocols.append(name.decode("latin-1"))
    if not protocols:
        raise ProtocolError("malformed ALPN extension: empty protocol list")
    return tuple(protocols)


def _parse_supported_versions(data: bytes) -> tuple[int, ...]:
    outer = _Reader(data, "supported_versions extension")
    raw = outer.vector(1, "versions")
    outer.expect_end()
    if not raw or len(raw) % 2:
        raise ProtocolError(f"malformed supported_versions extension: {len(raw)} bytes, need an even >0")
    return struct.unpack(f">{len(raw) // 2}H", raw)
