"""Recorded HTTP exchanges, to replay through a :class:`~oisp.event_decoder.Decoder`: :class:`RecordedExchange`.

A recording is a JSONL file with one exchange per line (lines that are OISP events may be mixed in; they are
replayed as they are)::

    {"request": {"method": "POST", "url": "https://api.openai.com/v1/chat/completions",
                 "headers": {"content-type": "application/json"}, "body": {"model": "gpt-4o-mini", ...}},
     "response": {"status": 200, "headers": {"content-type": "text/event-stream"},
                  "chunks": ["data: {...}\\n\\n", "data: [DONE]\\n\\n"]}}

``body`` is a JSON value (sent as its JSON text) or a string; ``body_base64`` gives bytes that are not text; a
response's body may also be given as ``chunks``, in the pieces it arrived in. ``headers`` is an object or a
list of ``[name, value]`` pairs (repeated names). A missing ``response`` is an exchange cut short. ``provider``
(optional) names the provider when the endpoint table does not know the host.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import attrs

from oisp.errors import EventValidationError
from oisp.events import Event

__all__ = ["RecordedExchange", "read_recording"]


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        return tuple((str(k), str(v)) for k, v in value.items())
    if isinstance(value, list):
        pairs = [pair for pair in value if isinstance(pair, list | tuple) and len(pair) == 2]
        return tuple((str(name), str(text)) for name, text in pairs)
    return ()


def _body(side: Mapping[str, Any]) -> bytes:
    if isinstance(side.get("body_base64"), str):
        return base64.b64decode(side["body_base64"])
    body = side.get("body")
    if body is None:
        return b""
    return body.encode("utf-8") if isinstance(body, str) else json.dumps(body, ensure_ascii=False).encode("utf-8")


def _chunk(value: Any) -> bytes:
    """A response chunk: text, or ``{"base64": ...}`` for bytes that are not text."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Mapping) and isinstance(value.get("base64"), str):
        return base64.b64decode(value["base64"])
    raise EventValidationError(f"a response chunk is a string or {{\"base64\": ...}}, not {type(value).__name__}")


@attrs.frozen(kw_only=True)
class RecordedExchange:
    """One HTTP exchange as recorded: the request, and the response (None: it never came) with its body in
    the pieces it arrived in. Bodies are content-decoded bytes."""

    method: str = "POST"
    url: str
    request_headers: tuple[tuple[str, str], ...] = ()
    request_body: bytes = b""
    status: int | None = 200
    response_headers: tuple[tuple[str, str], ...] = ()
    response_chunks: tuple[bytes, ...] = ()
    #: The provider's name, when the endpoint table does not know the host.
    provider: str | None = None

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> Self:
        """Read the JSON form of the module's documentation."""
        request = mapping.get("request")
        if not isinstance(request, Mapping) or not isinstance(request.get("url"), str):
            raise EventValidationError("a recorded exchange needs a request object with a url")
        response = mapping.get("response")
        chunks: tuple[bytes, ...] = ()
        status = None
        headers: tuple[tuple[str, str], ...] = ()
        if isinstance(response, Mapping):
            status = int(response.get("status", 200))
            headers = _headers(response.get("headers"))
            raw = response.get("chunks")
            chunks = tuple(_chunk(c) for c in raw) if isinstance(raw, list) else (_body(response),)
        provider = mapping.get("provider")
        return cls(method=str(request.get("method", "POST")).upper(), url=request["url"],
                   request_headers=_headers(request.get("headers")), request_body=_body(request), status=status,
                   response_headers=headers, response_chunks=tuple(c for c in chunks if c),
                   provider=provider if isinstance(provider, str) else None)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


def read_recording(path: str | Path) -> Iterator[RecordedExchange | Event]:
    """The exchanges (and events) of a recording, line by line; a line that is neither raises
    :class:`~oisp.errors.EventValidationError` with its number."""
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                if isinstance(value, Mapping) and "request" in value and "event_type" not in value:
                    yield RecordedExchange.from_dict(value)
                else:
                    yield Event.from_dict(value)
            except (json.JSONDecodeError, EventValidationError, ValueError, TypeError) as exc:
                raise EventValidationError(f"{path}:{number}: neither an exchange nor an event: {exc}") from None
