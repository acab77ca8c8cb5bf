"""The original-destination protocol: how a transparent proxy learns where a diverted connection was going.

The interceptor diverts a client's connection to the proxy's transparent listener. When the proxy accepts it,
it asks "where was this connection really going, and who opened it?" with the two addresses it can see on the
accepted socket, and gets an :class:`OriginalDestination` back (or None when the connection was not diverted,
for example a direct connection to the listener)::

    peer = sock.getpeername()[:2]    # "client" as the proxy sees it
    local = sock.getsockname()[:2]   # the listener's address for this connection
    dest = source.original_destination(peer, local)
    if dest is None:
        sock.close()                 # not a diverted connection: refuse it
    else:
        upstream = connect((dest.ip, dest.port), before_connect=mark_upstream_socket)

``peer`` is not necessarily the client's own address: for remote destinations the interceptor presents the
connection as coming *from* the original destination's address (that is how it stays a valid inbound packet),
which is why the lookup takes both ends. IPv4-mapped IPv6 addresses (``::ffff:198.51.100.7``) from dual-stack
listeners are accepted as their IPv4 form.

This module (and :mod:`oisp.contracts`, where the lookup's contract is) imports nothing platform-specific,
so the proxy can depend on it without importing pydivert.
"""

from __future__ import annotations

import attrs

from oisp.contracts import Address, OriginalDestinationSource
from oisp.netns import NetworkNamespace

__all__ = ["Address", "OriginalDestination", "OriginalDestinationSource"]

# Address and OriginalDestinationSource (the lookup's contract) are defined in :mod:`oisp.contracts` and
# re-exported here.


@attrs.frozen
class OriginalDestination:
    """Where a diverted connection was going, and what is known about who opened it.

    ``ip``/``port``: the address the client connected to (what the proxy must connect to upstream).
    ``client``: the client's own address (``ip``, ``port``) on its side of the connection.
    ``pid``: the client's process id, from the FLOW/SOCKET layers, or None when it is not known (the process
    is gone, or the connection was opened before the interceptor started).
    ``interface``: the name of the interface the connection left through (``"lo"``-like loopback included),
    or None when unknown.
    ``loopback``: True when client and destination are on this machine (local endpoints such as Ollama).
    ``netns``: the network namespace the client's socket is in (the one the interceptor diverts in), so that
    the socket can be looked up by ``client`` and the original destination; None where namespaces do not exist.
    """

    ip: str
    port: int
    pid: int | None = None
    interface: str | None = None
    client: Address | None = None
    loopback: bool = False
    netns: NetworkNamespace | None = None
