"""Facts of an HTTP exchange that every provider's events carry: the request id shared by an exchange's events,
latencies, how the request authenticated (key prefix and hash only), the provider's name, and a JSON body."""

from __future__ import annotations

import json
import re
from typing import Any

from oisp.events import AuthInfo
from oisp.http.exchange import HttpExchange
from oisp.redaction import key_fingerprint

__all__ = ["auth_from_exchange", "json_or_none", "latencies", "provider_name", "request_id_for"]


def provider_name(exchange: HttpExchange, declared: str | None = None) -> str:
    """The provider an exchange's events name: the decoder's own (``declared``), else the one the endpoint table
    (built from every provider plugin's ``oisp_endpoints`` and the configured hosts) gave the connection, else
    ``other``."""
    return declared or exchange.connection.provider or "other"


def json_or_none(data: bytes | bytearray | str) -> tuple[Any, str | None]:
    """Parse JSON: (value, None) or (None, why it failed)."""
    if not data:
        return None, "empty body"
    try:
        return json.loads(data), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"invalid JSON: {exc}"




def auth_from_exchange(exchange: HttpExchange) -> AuthInfo | None:
    """How the request authenticated: key prefix and hash only (``Authorization``, ``x-api-key``, ``api-key``,
    ``x-goog-api-key``, ``key`` query parameter; AWS SigV4 counts as a service account)."""
    headers = exchange.request.headers
    authorization = headers.get("authorization")
    if authorization and authorization.upper().startswith("AWS4-HMAC-SHA256"):
        credential = re.search(r"Credential=([A-Z0-9]+)/", authorization)
        key = credential.group(1) if credential else authorization
        fingerprint = key_fingerprint(key)
        return AuthInfo(type="service_account", key_prefix=fingerprint.prefix or None, key_hash=fingerprint.hash)
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        value = headers.get(name)
        if value:
            fingerprint = key_fingerprint(value)
            return AuthInfo(type="api_key", key_prefix=fingerprint.prefix or None, key_hash=fingerprint.hash)
    if authorization:
        fingerprint = key_fingerprint(authorization)
        bearer = authorization.lower().startswith("bearer ")
        kind = "api_key" if fingerprint.prefix else "oauth" if bearer else "unknown"
        return AuthInfo(type=kind, key_prefix=fingerprint.prefix or None, key_hash=fingerprint.hash)
    query = exchange.request.query
    match = re.search(r"(?:^|&)key=([^&]+)", query)
    if match:
        fingerprint = key_fingerprint(match.group(1))
        return AuthInfo(type="api_key", key_prefix=fingerprint.prefix or None, key_hash=fingerprint.hash)
    return AuthInfo(type="none")




def request_id_for(exchange: HttpExchange) -> str:
    """The ``request_id`` shared by every event of one exchange (unique across runs: see the connection id)."""
    return f"req_{exchange.connection.connection_id}_{exchange.exchange_id}"


def latencies(exchange: HttpExchange, first_content_ns: int | None = None) -> tuple[int | None, int | None]:
    """(total, time to first token) in ms. A stream's first token is the chunk that brought the first content,
    not its first byte (keep-alive comments and Azure's empty filter chunks come before any token)."""
    t = exchange.timings
    if t.request_start is None:
        return None, None
    total = (t.response_end - t.request_start) // 1_000_000 if t.response_end is not None else None
    first = first_content_ns or t.response_first_byte or t.response_headers
    ttft = (first - t.request_start) // 1_000_000 if first is not None else None
    return total, ttft
