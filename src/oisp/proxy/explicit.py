"""Sans-io parsing of what a client sends an explicit (forward) proxy: ``CONNECT host:port`` or an
absolute-form request (``GET http://localhost:11434/api/tags HTTP/1.1``)."""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

from oisp.errors import ProtocolError

__all__ = ["MAX_HEAD", "ProxyRequest", "parse_proxy_request"]

#: Longest request head accepted from a proxy client.
MAX_HEAD = 64 * 1024


@attrs.frozen
class ProxyRequest:
    """The target of a proxy request. ``tunnel`` is True for CONNECT; ``head_length`` is the size of the
    CONNECT head (the bytes after it are tunnel payload); absolute-form requests are forwarded in origin form
    (:mod:`oisp.proxy.forward`)."""

    method: str
    host: str
    port: int
    tunnel: bool
    head_length: int


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ProtocolError(f"invalid port in proxy target {text!r}") from None
    if not host or not 0 < port < 65536:
        raise ProtocolError(f"invalid proxy target {text!r}")
    return host, port


def parse_proxy_request(buffer: bytes) -> ProxyRequest | None:
    """Parse the head at the start of ``buffer``; None when more bytes are needed.

    Raises ``ProtocolError`` for anything that is not a CONNECT or an absolute-form HTTP request.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise ProtocolError(f"proxy request head longer than {MAX_HEAD} bytes")
        line_end = buffer.find(b"\r\n")
        if line_end < 0 and len(buffer) >= 16 and not buffer[:16].split(b" ")[0].isalpha():
            raise ProtocolError("not an HTTP proxy request")
        return None
    line = buffer[: buffer.find(b"\r\n")].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ProtocolError(f"malformed proxy request line {line[:100]!r}")
    method, target, _ = parts
    if method.upper() == "CONNECT":
        host, port = _split_host_port(target, 443)
        return ProxyRequest("CONNECT", host, port, True, end + 4)
    url = urlsplit(target)
    if url.scheme not in ("http",) or not url.hostname:
        raise ProtocolError(f"an explicit proxy takes CONNECT or absolute-form http:// requests, got {line[:100]!r}")
    port = url.port or 80
    return ProxyRequest(method, url.hostname, port, False, end + 4)
