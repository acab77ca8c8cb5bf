"""Upstream connections made ahead of need: TLS sessions kept for resumption, and spare (preconnected)
connections. The proxy (:mod:`oisp.proxy.server`) decides when to use them; this module holds their state
and rules."""

from __future__ import annotations

import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from oisp.proxy.report import ConnectionReport
from oisp.proxy.tls_stream import TlsStream

__all__ = ["MAX_SPARE_BUFFER", "PRECONNECT_DELAY", "SessionEntry", "Spare", "UpstreamSessions", "UpstreamTarget"]

#: The longest a spare upstream connection waits for the connection that prompted it to end before it is made.
PRECONNECT_DELAY = 0.05


class UpstreamSessions:
    """TLS sessions to offer upstream for resumption, one per (server name, upstream address, ALPN offer).

    Resuming skips the upstream's certificate and its verification (about 40% of the handshake's CPU). Only a
    session of a handshake made with the same context (so the same trust anchors and checks) to the same name
    and address is offered, and only within :attr:`MAX_AGE` of the full handshake that verified the certificate
    it carries. The server may always decline and make it a full, verified handshake, whose session then
    replaces the old one.

    TLS 1.3 tickets arrive after the handshake, so an entry first holds the connection's ``SSLObject`` and its
    session is taken out when the next connection asks (once: Python copies a session by encoding and decoding
    it, certificate included, which costs about as much as verifying it). That one session is then offered
    again and again; servers with stateless tickets accept that, the others fall back to full handshakes.
    """

    #: Longest time a verified certificate is taken on trust through resumption, in seconds.
    MAX_AGE = 3600.0
    MAX_ENTRIES = 256

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: OrderedDict[Any, SessionEntry] = OrderedDict()

    def get(self, key: Any, context: ssl.SSLContext) -> tuple[ssl.SSLSession | None, float | None]:
        """A session to offer and when the certificate it carries was verified, or (None, None)."""
        entry = self._entries.get(key)
        if entry is None or entry.context is not context or self._clock() - entry.verified_at > self.MAX_AGE:
            return None, None
        if entry.session is None and entry.connection is not None:
            session = entry.connection.session
            if session is None or not session.has_ticket:
                return None, None  # no ticket (yet)
            entry.session, entry.connection = session, None
        session = entry.session
        if session is None or session.time + session.timeout <= time.time():
            return None, None
        return session, entry.verified_at

    def put(self, key: Any, context: ssl.SSLContext, connection: ssl.SSLObject, *, resumed: bool,
            verified_at: float) -> None:
        """Record a connection just established: a full handshake's session replaces the one kept for ``key``
        (it is read later, tickets included); a resumed one leaves it."""
        if resumed and key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries.pop(key, None)
        self._entries[key] = SessionEntry(context, connection, None, verified_at)
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)


@attrs.define
class SessionEntry:
    context: ssl.SSLContext
    connection: ssl.SSLObject | None
    session: ssl.SSLSession | None
    verified_at: float


@attrs.frozen
class UpstreamTarget:
    """What an upstream connection was made for; a spare serves only a connection with the same one."""

    server_hostname: str
    connect_host: str
    port: int
    alpn_offer: tuple[str, ...]
    #: The same context object (SSLContext compares and hashes by identity): the same trust anchors and checks.
    context: ssl.SSLContext


#: Most plaintext a spare connection may receive unasked before it is dropped.
MAX_SPARE_BUFFER = 64 * 1024


@attrs.define(eq=False)
class Spare:
    """A spare upstream connection (preconnect), being made, held, or handed over."""

    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    #: Its connect and handshake are under way (it no longer waits for the connection that prompted it).
    opening: bool = False
    #: Set once it is ready (``stream``) or will never be (the keeper ended).
    settled: anyio.Event = attrs.field(factory=anyio.Event)
    #: Client connections waiting for it to be ready.
    waiting: int = 0
    stream: TlsStream | None = None
    #: The connect's upstream address and time.
    report: ConnectionReport | None = None
    buffered: bytearray = attrs.field(factory=bytearray)
    released: anyio.Event = attrs.field(factory=anyio.Event)
    taken: bool = False
    closing: bool = False
    dead: bool = False
