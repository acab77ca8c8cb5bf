"""The contracts between oisp's parts, as named :class:`typing.Protocol` classes, in one neutral module.

Each part (the proxy, the interceptor, the attributor, the decode side) depends on these shapes, not on each
other's classes, so any of them can be replaced (a script's own original-destination table, an attributor that
asks a container runtime, an observer that ships copies to another process, a network backend for tests):

* :class:`OriginalDestinationSource`: where a diverted connection was going (the interceptor implements it);
  its answers are :class:`Destination`, optionally :class:`DivertedDestination`.
* :class:`AttributionSource`: the process behind a connection (:class:`oisp.attribution.Attributor`); one that
  can answer cheaply on the event loop is a :class:`RecallingAttributionSource`.
* :class:`ProxyObserver`: what the proxy reports (connections) and where decoded exchanges go; one that decodes
  elsewhere is a :class:`FeedOpener` and receives raw copies (:class:`CopyFeed`).
* :class:`LeafIssuer`: the certificate authority the proxy asks for leaves and server contexts.
* :class:`ClientHelloInfo`: what the proxy reads from a parsed TLS ClientHello.
* :class:`NetworkBackend`: how the proxy opens TCP connections and runs TLS handshakes.

The optional capabilities (``recall``, ``open_feed``, a destination's ``client``) are found by
:func:`recall_of`, :func:`feed_opener_of` and :func:`diverted_client_of`, never by ad-hoc ``getattr`` in the proxy.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from anyio.abc import ByteStream, SocketStream

    from oisp.attribution import Attribution, ClientSocket
    from oisp.http.exchange import ConnectionInfo, ExchangeListener
    from oisp.netns import NetworkNamespace
    from oisp.proxy.net import SocketHook
    from oisp.proxy.relay import CopyFeed, PassiveDecoderLike
    from oisp.proxy.report import ConnectionReport
    from oisp.proxy.tls_stream import TlsStream

__all__ = [
    "Address",
    "AttributionSource",
    "ClientHelloInfo",
    "CopyFeed",
    "DecoderFactory",
    "Destination",
    "DivertedDestination",
    "FeedOpener",
    "LeafIssuer",
    "NetworkBackend",
    "OriginalDestinationSource",
    "PassiveDecoderLike",
    "ProxyObserver",
    "RecallingAttributionSource",
    "diverted_client_of",
    "feed_opener_of",
    "recall_of",
]



def __getattr__(name: str) -> Any:
    # The decode-side feed contracts are defined beside the relay that drives them; re-exported here lazily, so
    # that importing this module never imports the proxy package.
    if name in ("CopyFeed", "PassiveDecoderLike"):
        from oisp.proxy import relay

        return getattr(relay, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: An ``(ip, port)`` pair as sockets report it; the ip is text (``"198.51.100.7"``, ``"2001:db8::1"``).
Address = tuple[str, int]


# original destinations ----------------------------------------------------------------------------------------
class Destination(Protocol):
    """Where a diverted connection was going: the address to connect to upstream, and the client's process id
    when the diverter knows it (see :class:`oisp.interception.OriginalDestination`)."""

    @property
    def ip(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def pid(self) -> int | None: ...


@runtime_checkable
class DivertedDestination(Destination, Protocol):
    """A :class:`Destination` that also knows the client's own socket (its address on its side, and its network
    namespace), which lets the attributor find the socket exactly."""

    @property
    def client(self) -> Address | None: ...

    @property
    def netns(self) -> NetworkNamespace | None: ...


def diverted_client_of(destination: Destination) -> tuple[Address, NetworkNamespace | None] | None:
    """The client's own address and network namespace when ``destination`` is a :class:`DivertedDestination`
    that knows them, else None."""
    client: Address | None = getattr(destination, "client", None)
    if client is None:
        return None
    return (str(client[0]), int(client[1])), getattr(destination, "netns", None)


@runtime_checkable
class OriginalDestinationSource(Protocol):
    """Answers the proxy's original-destination lookups (implemented by the interceptor).

    ``client`` is the accepted socket's peer address and ``local`` its own address, exactly as
    ``getpeername()`` / ``getsockname()`` return them (only the first two items are used). The call never
    blocks: it reads a table the diverter keeps, and is safe to call from any thread or event loop. None means
    the connection was not diverted (it is then closed).
    """

    def original_destination(self, client: Address, local: Address) -> Destination | None:
        """The original destination of the diverted connection ``client`` -> ``local``, or None."""
        ...


# attribution --------------------------------------------------------------------------------------------------
class AttributionSource(Protocol):
    """Names the process behind a connection: (client address, local address, pid hint) as the proxy sees
    them, and for a diverted connection the client's own socket (``original``) -> attribution or None.

    It may take milliseconds (it may search every process): the proxy calls it in a worker thread."""

    def __call__(self, client: Address, local: Address, pid_hint: int | None, /, *,
                 original: ClientSocket | None = None) -> Attribution | None: ...


@runtime_checkable
class RecallingAttributionSource(AttributionSource, Protocol):
    """An :class:`AttributionSource` that can also answer cheaply, on the event loop, for a client seen before
    (:meth:`oisp.attribution.Attributor.recall`); None sends the proxy to the full lookup."""

    def recall(self, client: Address, local: Address, pid_hint: int | None, /, *,
               original: ClientSocket | None = None) -> Attribution | None: ...


def recall_of(source: AttributionSource) -> Callable[..., Attribution | None] | None:
    """The cheap ``recall`` of ``source`` when it has one, else None."""
    recall: Callable[..., Attribution | None] | None = getattr(source, "recall", None)
    return recall if callable(recall) else None


# the observer and the decode side ------------------------------------------------------------------------------
class ProxyObserver(Protocol):
    """Receives what the proxy learns. Calls happen in the proxy's event loop and must return quickly.

    An observer that decodes somewhere else (:class:`oisp.decoder_process.DecoderProcess`) is also a
    :class:`FeedOpener`: the proxy then hands it the raw copies of each decoded connection instead of asking
    for a listener.
    """

    def connection(self, report: ConnectionReport) -> None:
        """A connection's decision was made (once per client connection, per origin in forwarding)."""

    def exchange_listener(self, connection: ConnectionInfo) -> ExchangeListener | None:
        """The listener for this decoded connection's exchanges, or None to skip decoding."""


class FeedOpener(Protocol):
    """The optional capability of an observer that decodes elsewhere: a feed for the raw copies of one decoded
    connection (see :class:`oisp.proxy.relay.CopyFeed`), or None to skip decoding it."""

    def open_feed(self, connection: ConnectionInfo, alpn: str, *, body_cap: int) -> CopyFeed | None: ...


def feed_opener_of(observer: object) -> FeedOpener | None:
    """``observer`` as a :class:`FeedOpener` when it has an ``open_feed`` method, else None."""
    open_feed = getattr(observer, "open_feed", None)
    return observer if callable(open_feed) else None  # type: ignore[return-value]


#: Builds the passive decoder of a connection: (alpn, connection, listener, body_cap=..., max_table_size=...).
DecoderFactory = Callable[..., "PassiveDecoderLike"]


# TLS --------------------------------------------------------------------------------------------------------
class ClientHelloInfo(Protocol):
    """What the proxy reads from a parsed TLS ClientHello."""

    @property
    def sni(self) -> str | None: ...

    @property
    def alpn_protocols(self) -> tuple[str, ...]: ...


class LeafIssuer(Protocol):
    """The certificate authority as the proxy uses it (:class:`oisp.tls.CertificateAuthority`)."""

    def leaf_for(self, host: str) -> Any:
        """The leaf for ``host`` (cached); raises :class:`oisp.errors.CertificateError` when the CA may not
        vouch for it (a name-constrained CA)."""

    def server_context(self, host: str, alpn: Sequence[str] | None) -> ssl.SSLContext:
        """A server-side context presenting ``host``'s leaf and selecting exactly ``alpn``."""
        ...


# the network --------------------------------------------------------------------------------------------------
class NetworkBackend(Protocol):
    """How the proxy reaches the network: a TCP connect and the TLS handshakes. The default
    (:class:`oisp.proxy.service.AnyioNetwork`) uses real sockets; a test or an embedding may replace it."""

    async def connect_tcp(self, host: str, port: int, *, before_connect: SocketHook | None,
                          timeout: float) -> SocketStream:
        """A connected TCP stream to ``host:port``; raises ``OSError`` or ``TimeoutError``."""
        ...

    async def tls_client(self, stream: SocketStream, context: ssl.SSLContext, *, server_hostname: str,
                         session: ssl.SSLSession | None = None) -> TlsStream:
        """The client side of a TLS handshake over ``stream``."""
        ...

    async def tls_server(self, stream: ByteStream, context: ssl.SSLContext, *, initial_data: bytes) -> TlsStream:
        """The server side of a TLS handshake over ``stream``, ``initial_data`` being what the client sent
        already (its ClientHello)."""
        ...
