"""Leaf certificates encoded from a prototype: per host, a few byte joins and one ECDSA signature.

cryptography's ``CertificateBuilder`` re-encodes every extension from Python objects on each ``sign()``,
which costs about as much as the signature itself. All leaves of one CA share issuer, key, signature
algorithm and every extension but subjectAltName, so those parts are cut out of one certificate the builder
made (the prototype) and reused verbatim; only serial, validity, subject and subjectAltName are encoded per
leaf, in the DER the builder would produce (the tests compare the two byte for byte).
"""

from __future__ import annotations

from datetime import datetime
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

_SEQUENCE = 0x30
_SET = 0x31
_INTEGER = 0x02
_BOOLEAN_TRUE = b"\x01\x01\xff"
_OCTET_STRING = 0x04
_BIT_STRING = 0x03
_UTF8_STRING = 0x0C
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_EXTENSIONS = 0xA3  # [3] EXPLICIT
_DNS_NAME = 0x82  # [2] IMPLICIT IA5String
_IP_ADDRESS = 0x87  # [7] IMPLICIT OCTET STRING
_OID_COMMON_NAME = b"\x06\x03\x55\x04\x03"
_OID_SUBJECT_ALT_NAME = b"\x06\x03\x55\x1d\x11"
_EMPTY_NAME = b"\x30\x00"


def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _length(len(content)) + content


def _header(data: bytes, pos: int) -> tuple[int, int]:
    """Return (header size, content size) of the DER element starting at ``pos``."""
    size = data[pos + 1]
    if not size & 0x80:
        return 2, size
    count = size & 0x7F
    return 2 + count, int.from_bytes(data[pos + 2 : pos + 2 + count], "big")


def _children(data: bytes) -> list[bytes]:
    """Split concatenated DER elements (each tag, length and content) into a list."""
    elements = []
    pos = 0
    while pos < len(data):
        header, size = _header(data, pos)
        elements.append(data[pos : pos + header + size])
        pos += header + size
    return elements


def _content(element: bytes, tag: int) -> bytes:
    """The content of one DER element, checking its tag."""
    if element[0] != tag:
        raise ValueError(f"expected DER tag {tag:#x}, found {element[0]:#x}")
    header, size = _header(element, 0)
    return element[header : header + size]


def _time(moment: datetime) -> bytes:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 on.
    if moment.year < 2050:
        return _tlv(_UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return _tlv(_GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


class LeafEncoder:
    """Encodes and signs leaf certificates that differ from ``prototype`` only in their per-host fields.

    ``prototype`` must be signed by ``ca_key`` with ECDSA-SHA256 and carry every shared extension and no
    subjectAltName; its serial, validity and subject are replaced per leaf.
    """

    def __init__(self, prototype: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
        version, _serial, signature_algorithm, issuer, _validity, _subject, public_key, extensions = _children(
            _content(prototype.tbs_certificate_bytes, _SEQUENCE)
        )
        self._ca_key = ca_key
        self._signature = ec.ECDSA(hashes.SHA256())
        self._signature_algorithm = signature_algorithm
        self._head = version
        self._issuer = issuer
        self._public_key = public_key
        self._shared_extensions = _content(_content(extensions, _EXTENSIONS), _SEQUENCE)

    def encode(
        self,
        *,
        serial: int,
        not_before: datetime,
        not_after: datetime,
        common_name: str | None,
        address: IPv4Address | IPv6Address | None,
        dns_name: str,
    ) -> bytes:
        """Return the DER certificate: subject CN ``common_name`` (or empty), SAN ``address`` or ``dns_name``.

        The subjectAltName is critical exactly when the subject is empty (RFC 5280 4.2.1.6). Times must be
        UTC with whole seconds; ``serial`` positive.
        """
        if common_name is None:
            subject = _EMPTY_NAME
        else:
            attribute = _tlv(_SEQUENCE, _OID_COMMON_NAME + _tlv(_UTF8_STRING, common_name.encode("utf-8")))
            subject = _tlv(_SEQUENCE, _tlv(_SET, attribute))
        if address is not None:
            general_name = _tlv(_IP_ADDRESS, address.packed)
        else:
            general_name = _tlv(_DNS_NAME, dns_name.encode("ascii"))
        critical = _BOOLEAN_TRUE if common_name is None else b""
        san = _tlv(
            _SEQUENCE,
            _OID_SUBJECT_ALT_NAME + critical + _tlv(_OCTET_STRING, _tlv(_SEQUENCE, general_name)),
        )
        tbs = _tlv(
            _SEQUENCE,
            self._head
            + _tlv(_INTEGER, serial.to_bytes(serial.bit_length() // 8 + 1, "big"))
            + self._signature_algorithm
            + self._issuer
            + _tlv(_SEQUENCE, _time(not_before) + _time(not_after))
            + subject
            + self._public_key
            + _tlv(_EXTENSIONS, _tlv(_SEQUENCE, self._shared_extensions + san)),
        )
        signature = self._ca_key.sign(tbs, self._signature)
        return _tlv(_SEQUENCE, tbs + self._signature_algorithm + _tlv(_BIT_STRING, b"\x00" + signature))
