"""Configuration of the :class:`~oisp.proxy.MitmProxy`."""

from __future__ import annotations

import enum
import ipaddress
from pathlib import Path
from typing import Any

import attrs

from oisp.errors import ConfigurationError
from oisp.http.exchange import DEFAULT_BODY_CAP

__all__ = ["ProxyConfig", "ProxyMode", "UpstreamOverride"]


class ProxyMode(enum.StrEnum):
    """How clients reach the proxy and how it learns where they meant to go."""

    #: Clients are configured with the proxy (HTTPS_PROXY): CONNECT tunnels and absolute-form http://.
    EXPLICIT = "explicit"
    #: Connections are diverted to the proxy; the original destination comes from the interceptor.
    TRANSPARENT = "transparent"
    #: Clients use the proxy as their base URL (plain HTTP); it forwards to one fixed upstream over TLS.
    REVERSE = "reverse"


@attrs.frozen
class UpstreamOverride:
    """Connect to ``address:address_port`` whenever the upstream is ``host:port`` (like curl's --resolve and
    --connect-to). TLS still uses ``host`` for SNI and certificate verification."""

    host: str
    port: int
    address: str
    address_port: int

    @classmethod
    def parse(cls, text: str) -> UpstreamOverride:
        """``HOST:PORT:ADDR`` (curl --resolve) or ``HOST:PORT:ADDR:PORT2`` (curl --connect-to).

        IPv6 addresses go in brackets: ``api.openai.com:443:[::1]:8443``.
        """
        host, sep, rest = text.partition(":")
        port_text, sep2, addr_part = rest.partition(":")
        if not (sep and sep2 and host and addr_part):
            raise ConfigurationError(f"resolve: {text!r} is not HOST:PORT:ADDR or HOST:PORT:ADDR:PORT")
        if addr_part.startswith("["):
            address, _, tail = addr_part[1:].partition("]")
            addr_port_text = tail[1:] if tail.startswith(":") else ""
        elif addr_part.count(":") == 1:
            address, addr_port_text = addr_part.split(":")
        else:
            address, addr_port_text = addr_part, ""
        try:
            port = int(port_text)
            addr_port = int(addr_port_text) if addr_port_text else port
            ipaddress.ip_address(address) if address[0].isdigit() or ":" in address else None
        except ValueError:
            raise ConfigurationError(f"resolve: {text!r} has an invalid port or address") from None
        for value in (port, addr_port):
            if not 0 < value < 65536:
                raise ConfigurationError(f"resolve: port {value} in {text!r} must be 1-65535")
        return cls(host.lower(), port, address, addr_port)


def _positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value <= 0:
        raise ConfigurationError(f"proxy.{attribute.name}: {value!r} must be positive")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value < 0:
        raise ConfigurationError(f"proxy.{attribute.name}: {value!r} must be 0 or more")


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """Everything the proxy needs to know; validated on construction."""

    mode: ProxyMode = attrs.field(default=ProxyMode.EXPLICIT, converter=ProxyMode)
    listen_host: str = "127.0.0.1"
    #: 0 picks a free port (the bound address is reported when the proxy starts).
    listen_port: int = 8080
    #: An extra CA bundle trusted for upstream servers, besides the operating system's store.
    upstream_ca: Path | None = None
    #: Do not verify upstream certificates. Dangerous; only for explicit, deliberate use.
    upstream_insecure: bool = False
    overrides: tuple[UpstreamOverride, ...] = ()
    #: Reverse mode: the upstream base URL the proxy stands in for (``https://api.openai.com``).
    reverse_target: str | None = None
    body_cap: int = attrs.field(default=DEFAULT_BODY_CAP, validator=_positive)
    pinned_ttl: float = attrs.field(default=300.0, validator=_positive)
    handshake_timeout: float = attrs.field(default=15.0, validator=_positive)
    #: The longest a connection that has not carried a byte of data either way is kept, from its start: a client
    #: that never sends a ClientHello is passed through after ``handshake_timeout`` (fail-open), then closed if
    #: still nothing has been said by either side.
    silent_lifetime: float = attrs.field(default=60.0, validator=_positive)
    #: Bytes of HPACK dynamic table an HTTP/2 decoder mirrors per direction (see :class:`oisp.http.h2.Http2Decoder`).
    hpack_table_cap: int = attrs.field(default=256 * 1024, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Chunks queued for a connection's decoder before it is declared too slow (decoding stops, relay goes on).
    decode_queue: int = attrs.field(default=4096, validator=_positive)
    #: Upstream preconnect (like Envoy's preconnect_policy): after a client connection to an AI endpoint is
    #: served over a new upstream connection, one spare connection to the same upstream (same name, address and
    #: ALPN offer), handshaken and verified, is opened in the background and kept this many seconds for the
    #: next client connection. 0 disables it.
    preconnect_idle: float = attrs.field(default=5.0, validator=_not_negative)
    #: Clamp TCP_MAXSEG of the listener (transparent mode on loopback needs <= 32000).
    listen_max_segment: int | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.listen_port < 65536:
            raise ConfigurationError(f"proxy.listen_port: {self.listen_port!r} must be 0-65535")
        if self.mode is ProxyMode.REVERSE and not self.reverse_target:
            raise ConfigurationError("proxy.reverse_target: reverse mode needs the upstream URL it stands in for")
        if self.reverse_target:
            from oisp.proxy.reverse import ReverseTarget

            ReverseTarget(self.reverse_target)  # a URL it cannot use is an error now, not on every connection
        if self.upstream_ca is not None and not Path(self.upstream_ca).is_file():
            raise ConfigurationError(f"proxy.upstream_ca: {str(self.upstream_ca)!r} is not a readable file")

    def override_for(self, host: str, port: int) -> tuple[str, int]:
        """Where to connect for the upstream ``host:port``."""
        for override in self.overrides:
            if override.host == host.lower() and override.port == port:
                return override.address, override.address_port
        return host, port

    @property
    def listens_beyond_loopback(self) -> bool:
        """True when the listener is reachable from other machines."""
        try:
            return not ipaddress.ip_address(self.listen_host).is_loopback
        except ValueError:
            return self.listen_host.lower() != "localhost"
