"""Cursor (the AI code editor, by Anysphere): its API hosts, as endpoints whose calls the gRPC/Connect decoder
reads (:mod:`oisp.providers.grpc`).

Cursor's editor talks to its backend with Connect/gRPC over HTTP/2 (bidirectional streams for chat and the
agent, falling back to HTTP/1.1 where HTTP/2 is broken). Its message schemas are not published, so its calls are
reported at the metadata level only: service, method, message counts and sizes, status and timings, never the
prompts or answers. Cursor's own network documentation asks firewalls to allow ``*.cursor.sh``; the hosts below
are the API hosts among them (chat and agent, telemetry and settings, codebase indexing). Sign-in
(``authenticator.cursor.sh``), downloads and the extension marketplace are left alone. More hosts can be added
in the configuration (``[endpoints] add``), with the provider ``cursor``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from oisp.hookspecs import EndpointSpec, hookimpl

__all__ = ["CURSOR_ENDPOINTS"]

#: Cursor's API hosts.
CURSOR_ENDPOINTS: Final = (
    EndpointSpec("cursor", "api2.cursor.sh"),
    EndpointSpec("cursor", "api3.cursor.sh"),
    EndpointSpec("cursor", "api4.cursor.sh"),
    EndpointSpec("cursor", "repo42.cursor.sh"),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return CURSOR_ENDPOINTS
