"""Gemini Live: the ``BidiGenerateContent`` WebSocket API of the Gemini API
(``/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent``, also ``v1alpha`` and the
``...Constrained`` variant for ephemeral tokens) and of Vertex AI (``.../LlmBidiService/BidiGenerateContent``).

A :class:`~oisp.provider_kit.WebSocketSessionDecoder` whose responses are read by the Gemini decoder
(:class:`~oisp.providers.google.GeminiDecoder`) as if they were ``streamGenerateContent`` calls:

* the client's ``setup`` gives the model, ``generationConfig``, ``systemInstruction`` and ``tools`` of every
  request of the session;
* a request is ``clientContent`` turns ending with ``turnComplete``, a ``toolResponse`` (its
  ``functionResponses`` become ``agent.tool_result`` events linked to the calls), or, with automatic activity
  detection, the server starting to answer streamed ``realtimeInput``;
* the server's ``serverContent.modelTurn`` parts (and ``outputTranscription`` of spoken answers) are the
  response, ``toolCall.functionCalls`` its tool calls (the response ends there: the model waits for the tool
  response), ``turnComplete`` (or ``interrupted``) its end, and ``usageMetadata`` its usage, with the token
  counts per modality in ``usage`` (``input_audio_tokens``, ``output_text_tokens``, ...).

Audio and video are never stored: ``realtimeInput`` media and inline audio of the model's turns are counted
(``google.live.input_audio_bytes``, ``google.live.output_audio_bytes``, and ``..._audio_ms`` for PCM whose
MIME type gives the rate).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from oisp.events import Event
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import ApiDecoder, DecoderContext, OpenResponse, WebSocketSessionDecoder, base64_size
from oisp.providers.google import GeminiDecoder, GoogleRoute

__all__ = ["GeminiLiveDecoder", "is_live_path"]

_LIVE_PATH = re.compile(r"^/+ws/google\.(?:ai\.generativelanguage\.(?P<gv>v1\w*)\.GenerativeService\."
                        r"|cloud\.aiplatform\.(?P<vv>v1\w*)\.LlmBidiService/)BidiGenerateContent\w*$")
_RATE = re.compile(r"rate=(\d+)")


def is_live_path(path: str) -> bool:
    """Whether ``path`` is a Gemini Live endpoint."""
    return _LIVE_PATH.match(path) is not None


def _field(value: Mapping[str, Any], camel: str, snake: str) -> Any:
    return value.get(camel, value.get(snake))


def _media_bytes(chunks: Iterable[Any]) -> tuple[int, int | None]:
    """(decoded bytes, bytes per second when PCM with a rate) of base64 media blobs."""
    total, rate = 0, None
    for blob in chunks:
        if not isinstance(blob, Mapping):
            continue
        mime = _field(blob, "mimeType", "mime_type")
        if isinstance(mime, str) and not mime.startswith("audio/"):
            continue
        total += base64_size(blob.get("data"))
        match = _RATE.search(mime) if isinstance(mime, str) else None
        if match is not None and "pcm" in mime:
            rate = int(match.group(1)) * 2
    return total, rate


class GeminiLiveDecoder(WebSocketSessionDecoder):
    """One Gemini Live session (see the module docstring)."""

    def __init__(self, exchange: HttpExchange, *, context: DecoderContext | None = None,
                 streaming_chunks: bool = False) -> None:
        super().__init__(context=context, streaming_chunks=streaming_chunks)
        match = _LIVE_PATH.match(exchange.request.path)
        self.version = (match["gv"] or match["vv"]) if match is not None else "v1beta"
        self.setup: dict[str, Any] = {}
        self.model = "unknown"
        self.contents: list[Any] = []
        self.input_audio_bytes = 0
        self.input_rate: int | None = 32_000  # 16 kHz, 16-bit PCM: what the API takes
        self.output_rate = 48_000  # 24 kHz, 16-bit PCM: what it answers

    def response_decoder(self) -> ApiDecoder:
        route = GoogleRoute(version=self.version, method="streamGenerateContent", model=self.model,
                            collection="models")
        return GeminiDecoder(route, context=self.context, streaming_chunks=self.streaming_chunks)

    def _open(self, exchange: HttpExchange, now: int) -> tuple[OpenResponse, list[Event]]:
        body: dict[str, Any] = {"contents": self.contents}
        for camel, snake in (("generationConfig", "generation_config"), ("systemInstruction", "system_instruction"),
                             ("tools", "tools"), ("toolConfig", "tool_config")):
            value = _field(self.setup, camel, snake)
            if value is not None:
                body[camel] = value
        self.contents = []
        attributes: dict[str, Any] = {"google.live": True}
        if self.input_audio_bytes:
            attributes["google.live.input_audio_bytes"] = self.input_audio_bytes
            if self.input_rate:
                attributes["google.live.input_audio_ms"] = self.input_audio_bytes * 1000 // self.input_rate
        self.input_audio_bytes = 0
        return self.open_response(exchange, body, now, attributes)

    def client_event(self, exchange: HttpExchange, event: dict[str, Any], now: int) -> Iterable[Event]:
        setup = event.get("setup") or event.get("config")
        if isinstance(setup, Mapping):
            self.setup = dict(setup)
            model = setup.get("model")
            if isinstance(model, str) and model:
                self.model = model.rsplit("/models/", 1)[-1].removeprefix("models/")
            return ()
        content = _field(event, "clientContent", "client_content")
        if isinstance(content, Mapping):
            turns = content.get("turns")
            self.contents += turns if isinstance(turns, list) else [turns] if isinstance(turns, Mapping) else []
            if _field(content, "turnComplete", "turn_complete"):
                return self._open(exchange, now)[1]
            return ()
        media = _field(event, "realtimeInput", "realtime_input")
        if isinstance(media, Mapping):
            chunks = list(media.get("mediaChunks") or media.get("media_chunks") or [])
            if isinstance(media.get("audio"), Mapping):
                chunks.append(media["audio"])
            size, rate = _media_bytes(chunks)
            self.input_audio_bytes += size
            self.input_rate = rate or self.input_rate
            if isinstance(media.get("text"), str):
                self.contents.append({"role": "user", "parts": [{"text": media["text"]}]})
            return ()
        response = _field(event, "toolResponse", "tool_response")
        if isinstance(response, Mapping):
            calls = _field(response, "functionResponses", "function_responses")
            parts = [{"functionResponse": call} for call in calls if isinstance(call, Mapping)] \
                if isinstance(calls, list) else []
            self.contents.append({"role": "user", "parts": parts})
            return self._open(exchange, now)[1]
        return ()

    def server_event(self, exchange: HttpExchange, event: dict[str, Any], now: int) -> Iterable[Event]:
        content = _field(event, "serverContent", "server_content")
        calls = _field(event, "toolCall", "tool_call")
        usage = _field(event, "usageMetadata", "usage_metadata")
        if not isinstance(content, Mapping) and not isinstance(calls, Mapping) and not isinstance(usage, Mapping):
            return ()
        events: list[Event] = []
        item = self.open[0] if self.open else None
        if item is None:
            if not isinstance(content, Mapping) and not isinstance(calls, Mapping):
                return ()  # usage after the turn ended: nothing left to attach it to
            item, events = self._open(exchange, now)  # the server answered streamed input on its own
        parts: list[Any] = []
        done = False
        reason = None
        if isinstance(content, Mapping):
            turn = _field(content, "modelTurn", "model_turn")
            for part in (turn.get("parts") if isinstance(turn, Mapping) else None) or []:
                inline = _field(part, "inlineData", "inline_data") if isinstance(part, Mapping) else None
                if isinstance(inline, Mapping):
                    size, rate = _media_bytes([inline])
                    item.output_audio_bytes += size
                    self.output_rate = rate or self.output_rate
                    continue
                parts.append(part)
            transcription = _field(content, "outputTranscription", "output_transcription")
            if isinstance(transcription, Mapping) and isinstance(transcription.get("text"), str):
                parts.append({"text": transcription["text"]})
            if content.get("interrupted"):
                done, reason = True, "interrupted"
            elif _field(content, "turnComplete", "turn_complete"):
                done, reason = True, "STOP"
        if isinstance(calls, Mapping):
            functions = _field(calls, "functionCalls", "function_calls")
            parts += [{"functionCall": call} for call in functions if isinstance(call, Mapping)] \
                if isinstance(functions, list) else []
            done, reason = True, "STOP"
        chunk: dict[str, Any] = {}
        if parts or reason:
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
            if reason:
                candidate["finishReason"] = reason
            chunk["candidates"] = [candidate]
        if isinstance(usage, Mapping):
            chunk["usageMetadata"] = self._usage(usage, item)
        if chunk:
            events += self.response_event(item, chunk, now)
        if done:
            audio: dict[str, Any] = {"google.live": True}
            if item.output_audio_bytes:
                audio["google.live.output_audio_bytes"] = item.output_audio_bytes
                audio["google.live.output_audio_ms"] = item.output_audio_bytes * 1000 // self.output_rate
            events += self.close_response(item, now, audio)
        return events

    @staticmethod
    def _usage(usage: Mapping[str, Any], item: OpenResponse) -> dict[str, Any]:
        """Live's usage (``responseTokenCount``, per-modality details) in ``generateContent``'s names."""
        out = dict(usage)
        response_tokens = _field(usage, "responseTokenCount", "response_token_count")
        if response_tokens is not None and _field(usage, "candidatesTokenCount", "candidates_token_count") is None:
            out["candidatesTokenCount"] = response_tokens
        for prefix, camel, snake in (("input", "promptTokensDetails", "prompt_tokens_details"),
                                     ("output", "responseTokensDetails", "response_tokens_details")):
            details = _field(usage, camel, snake)
            for detail in details if isinstance(details, list) else []:
                if not isinstance(detail, Mapping):
                    continue
                modality = detail.get("modality")
                count = _field(detail, "tokenCount", "token_count")
                if isinstance(modality, str) and isinstance(count, int) and not isinstance(count, bool):
                    item.usage_extra[f"{prefix}_{modality.lower()}_tokens"] = count
        return out
