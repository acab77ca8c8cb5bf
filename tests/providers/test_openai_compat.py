"""Azure OpenAI and the OpenAI-compatible APIs: what each does differently, and which exchanges are ours."""

from __future__ import annotations

import json

import pytest
from attrs import evolve
from tests.providers.fixtures.openai.replay import Case, case_names, exchange_for, load, of_type, one, replay

from oisp.event_decoder import EventDecoder
from oisp.events import AiRequest, AiResponse, Event
from oisp.hookspecs import DecoderSettings
from oisp.http.exchange import Headers, HttpResponse
from oisp.plugins import create_plugin_manager
from oisp.provider_kit import DecoderContext, ResponseState
from oisp.providers.openai import oisp_exchange_decoder
from oisp.providers.openai_common import openai_usage, route_for

# --- Azure OpenAI ----------------------------------------------------------------------------------------

def test_azure_deployment_stands_in_for_the_model_and_api_version_is_kept() -> None:
    events = replay(load("azure_chat_stream"))
    request = one(events, "ai.request")
    data: AiRequest = request.data
    assert data.provider is not None and data.provider.name == "azure_openai"
    assert data.model is not None and data.model.id == "gpt4o-prod"
    assert request.attrs["azure.deployment"] == "gpt4o-prod"
    assert request.attrs["openai.api_version"] == "2024-10-21"
    assert data.auth is not None and data.auth.type == "api_key"
    assert "api-key" not in request.to_json() and "3f9a1c7e" not in (data.provider.endpoint or "")


def test_azure_stream_with_an_empty_filter_chunk_first() -> None:
    response = one(replay(load("azure_chat_stream")), "ai.response")
    data: AiResponse = response.data
    assert data.model is not None and data.model.id == "gpt-4o-2024-11-20"
    assert data.provider_request_id == "chatcmpl-AzUre1"
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "Teal."
    assert data.extra["prompt_filter_results"][0]["content_filter_results"]["jailbreak"]["detected"] is False
    assert data.extra["content_filter_results"]["0"]["violence"]["severity"] == "safe"
    assert data.usage is not None and data.usage.total_tokens == 23 and data.success is True
    assert response.confidence.completeness == "full"


def test_azure_content_filter_finish_reason() -> None:
    events = replay(load("azure_chat_content_filter"))
    request: AiRequest = one(events, "ai.request").data
    assert request.auth is not None and request.auth.type == "oauth"  # Entra ID bearer token
    data: AiResponse = one(events, "ai.response").data
    assert data.finish_reason == "content_filter" and data.success is True
    assert data.extra["content_filter_results"]["0"]["violence"] == {"filtered": True, "severity": "high"}
    assert data.extra["prompt_filter_results"][0]["prompt_index"] == 0


def test_azure_content_filter_error_keeps_the_inner_error() -> None:
    data: AiResponse = one(replay(load("azure_chat_error_content_filter")), "ai.response").data
    assert data.success is False and data.status_code == 400
    assert data.error is not None and data.error.code == "content_filter" and data.error.type == "content_filter"
    assert data.error.extra["innererror"]["code"] == "ResponsibleAIPolicyViolation"


def test_azure_embeddings_through_a_deployment() -> None:
    events = replay(load("azure_embeddings"))
    assert one(events, "ai.request").data.model.id == "embed-small"
    embedding = one(events, "ai.embedding").data
    assert embedding.dimensions == 4 and embedding.input_count == 1
    assert embedding.model.id == "text-embedding-3-small"


# --- OpenAI-compatible APIs ------------------------------------------------------------------------------

def test_mistral_whole_tool_call_in_one_chunk_and_unrequested_usage() -> None:
    events = replay(load("mistral_chat_stream_tools"))
    request: AiRequest = one(events, "ai.request").data
    assert request.provider is not None and request.provider.name == "mistral"
    assert request.tool_choice == "any" and request.parameters is not None
    assert request.parameters.extra["random_seed"] == 7
    data: AiResponse = one(events, "ai.response").data
    assert [(c.id, c.name, c.arguments) for c in data.tool_calls or []] == [
        ("D681PevKs", "retrieve_payment_status", '{"transaction_id": "T1001"}')]
    assert data.usage is not None and (data.usage.prompt_tokens, data.usage.completion_tokens) == (94, 24)
    assert one(events, "agent.tool_call").data.arguments == {"transaction_id": "T1001"}


def test_mistral_thinking_parts_are_reasoning_not_answer() -> None:
    data: AiResponse = one(replay(load("mistral_chat_thinking")), "ai.response").data
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "4"
    assert data.extra["thinking"] == "Adding two and two gives four."


def test_mistral_fill_in_the_middle() -> None:
    events = replay(load("mistral_fim"))
    request: AiRequest = one(events, "ai.request").data
    assert request.request_type == "completion" and request.messages is not None
    assert request.messages[0].extra["suffix"] == "\nprint(add(1, 2))"
    data: AiResponse = one(events, "ai.response").data
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "    return a + b\n"


def test_groq_usage_in_x_groq() -> None:
    data: AiResponse = one(replay(load("groq_chat_stream")), "ai.response").data
    assert data.usage is not None and (data.usage.prompt_tokens, data.usage.completion_tokens,
                                       data.usage.total_tokens) == (36, 8, 44)
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "Hello! How can I help?"


def test_sse_error_event_after_text_fails_the_response_and_keeps_the_text() -> None:
    data: AiResponse = one(replay(load("groq_chat_stream_error_event")), "ai.response").data
    assert data.success is False and data.error is not None
    assert (data.error.type, data.error.message) == ("internal_server_error", "Service Unavailable")
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "Once" and data.extra["thinking"] == "User wants a story."


def test_whole_tool_calls_without_index_in_separate_chunks_stay_separate() -> None:
    events = replay(load("together_chat_stream_whole_calls"))
    request: AiRequest = one(events, "ai.request").data
    assert request.parameters is not None and request.parameters.extra["top_k"] == 50
    data: AiResponse = one(events, "ai.response").data
    assert [(c.id, c.arguments) for c in data.tool_calls or []] == [
        ("call_pAr1s", '{"city": "Paris"}'), ("call_r0me", '{"city": "Rome"}')]
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content is None  # the top-level text field is not counted twice
    assert data.usage is not None and data.usage.total_tokens == 222
    assert len(of_type(events, "agent.tool_call")) == 2


def test_fireworks_inference_prefix() -> None:
    events = replay(load("fireworks_chat"))
    assert one(events, "ai.request").data.provider.name == "fireworks"
    data: AiResponse = one(events, "ai.response").data
    assert data.model is not None and data.model.id == "accounts/fireworks/models/deepseek-v3p1"
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "Pong"


def test_perplexity_repeated_message_is_not_counted_twice_and_citations_are_kept() -> None:
    events = replay(load("perplexity_chat_stream"))
    request = one(events, "ai.request")
    assert request.data.provider.name == "perplexity" and request.attrs["http.path"] == "/chat/completions"
    data: AiResponse = one(events, "ai.response").data
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "The Burj Khalifa in Dubai [1]."
    assert data.extra["citations"] == ["https://en.wikipedia.org/wiki/Burj_Khalifa"]
    assert data.extra["search_results"][0]["title"] == "Burj Khalifa"
    assert data.usage is not None and data.usage.completion_tokens == 9


def test_openrouter_comments_upstream_provider_reasoning_and_usage() -> None:
    events = replay(load("openrouter_chat_stream"))
    request: AiRequest = one(events, "ai.request").data
    assert request.parameters is not None and request.parameters.extra["models"][1] == "anthropic/claude-sonnet-4.5"
    data: AiResponse = one(events, "ai.response").data
    assert data.extra["upstream_provider"] == "OpenAI" and data.extra["thinking"] == "Clear day."
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "Blue" and data.finish_reason == "stop"
    assert data.usage is not None and data.usage.total_tokens == 13
    assert data.provider_request_id == "gen-1745001300-AbCdEfGhIjKlMnOp"


def test_openrouter_error_inside_a_200_stream() -> None:
    data: AiResponse = one(replay(load("openrouter_chat_stream_error")), "ai.response").data
    assert data.status_code == 200 and data.success is False
    assert data.error is not None and data.error.code == "server_error"
    assert data.error.message == "Provider disconnected unexpectedly"
    assert data.finish_reason == "error"
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "Entropy measures"


def test_deepseek_reasoning_content_and_cache_hit_tokens() -> None:
    events = replay(load("deepseek_chat_stream"))
    assert one(events, "ai.request").data.provider.name == "deepseek"
    data: AiResponse = one(events, "ai.response").data
    assert data.extra["thinking"] == "Compare 9.11 and 9.80: 0.80 > 0.11."
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "9.8 is larger."
    assert data.usage is not None
    assert (data.usage.cached_tokens, data.usage.reasoning_tokens, data.usage.total_tokens) == (0, 112, 140)


def test_deepseek_cache_hit_tokens_count_when_the_openai_field_is_absent() -> None:
    state = ResponseState()
    openai_usage(state, {"prompt_tokens": 20, "completion_tokens": 5, "prompt_cache_hit_tokens": 16,
                         "prompt_cache_miss_tokens": 4})
    assert state.usage == {"prompt_tokens": 20, "completion_tokens": 5, "cached_tokens": 16}


def test_xai_reasoning_content_and_tokens() -> None:
    events = replay(load("xai_chat"))
    assert one(events, "ai.request").data.parameters.extra["reasoning_effort"] == "high"
    data: AiResponse = one(events, "ai.response").data
    assert data.extra["thinking"] == "101 times 3 is 303."
    assert data.usage is not None and (data.usage.reasoning_tokens, data.usage.cached_tokens) == (320, 6)


def test_huggingface_tgi_tool_call_object_with_fragments() -> None:
    events = replay(load("huggingface_router_stream_tools"))
    request: AiRequest = one(events, "ai.request").data
    assert request.provider is not None and request.provider.name == "huggingface"
    assert request.model is not None and request.model.id == "meta-llama/Llama-3.1-8B-Instruct:novita"
    data: AiResponse = one(events, "ai.response").data
    assert [(c.id, c.name, c.arguments) for c in data.tool_calls or []] == [("0", "web_search", '{"q": "oisp"}')]
    assert data.finish_reason == "stop"
    assert one(events, "agent.tool_call").data.tool.type == "search"


def test_lmstudio_plain_http() -> None:
    events = replay(load("lmstudio_chat"))
    request = one(events, "ai.request")
    assert request.data.provider.name == "lmstudio" and request.confidence.content_source == "plaintext_capture"
    assert request.data.auth.type == "none"
    data: AiResponse = one(events, "ai.response").data
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "Hello! How can I help?"


def test_ollama_openai_endpoint_whole_tool_call() -> None:
    events = replay(load("ollama_v1_chat_stream"))
    assert one(events, "ai.request").data.provider.name == "ollama"
    data: AiResponse = one(events, "ai.response").data
    assert [(c.id, c.name) for c in data.tool_calls or []] == [("call_k2h5n9ae", "bash")]
    assert data.usage is not None and data.usage.total_tokens == 179
    assert one(events, "agent.tool_call").data.tool.type == "shell"


# --- routing ---------------------------------------------------------------------------------------------

def _case(url: str, method: str = "POST") -> Case:
    return Case("adhoc", method, url, [], b"{}", 200, [("content-type", "application/json")], b"{}", {})


@pytest.mark.parametrize(("url", "api"), [
    ("https://api.openai.com/v1/chat/completions", "chat"),
    ("https://api.openai.com/v1/completions", "completions"),
    ("https://api.openai.com/v1/embeddings", "embeddings"),
    ("https://api.openai.com/v1/responses", "responses"),
    ("https://api.openai.com/v1/responses/", "responses"),
    ("https://myres.openai.azure.com/openai/deployments/d1/chat/completions?api-version=2024-10-21", "chat"),
    ("https://myres.openai.azure.com/openai/deployments/d1/extensions/chat/completions?api-version=1", "chat"),
    ("https://myres.openai.azure.com/openai/deployments/d1/completions?api-version=1", "completions"),
    ("https://myres.openai.azure.com/openai/v1/responses", "responses"),
    ("https://myres.openai.azure.com/openai/responses?api-version=2025-04-01-preview", "responses"),
    ("https://api.groq.com/openai/v1/chat/completions", "chat"),
    ("https://api.fireworks.ai/inference/v1/completions", "completions"),
    ("https://api.perplexity.ai/chat/completions", "chat"),
    ("https://api.deepseek.com/v1/chat/completions", "chat"),
    ("https://api.mistral.ai/v1/fim/completions", "completions"),
    ("https://api.mistral.ai/v1/embeddings", "embeddings"),
    ("https://openrouter.ai/api/v1/chat/completions", "chat"),
    ("https://api.x.ai/v1/responses", "responses"),
    ("https://router.huggingface.co/v1/chat/completions", "chat"),
    ("https://api-inference.huggingface.co/models/meta-llama/Llama-3.1-8B-Instruct/v1/chat/completions", "chat"),
    ("http://localhost:11434/v1/embeddings", "embeddings"),
    ("http://127.0.0.1:1234/v1/completions", "completions"),
])
def test_dialect_endpoints_are_claimed(url: str, api: str) -> None:
    route = route_for(exchange_for(_case(url)))
    assert route is not None and route.api == api


@pytest.mark.parametrize(("url", "method"), [
    ("https://api.openai.com/v1/models", "GET"),
    ("https://api.openai.com/v1/chat/completions", "GET"),
    ("https://api.openai.com/v1/chat/completions/chatcmpl-123", "GET"),
    ("https://api.openai.com/v1/responses/resp_123", "GET"),
    ("https://api.openai.com/v1/responses/resp_123/cancel", "POST"),
    ("https://api.openai.com/v1/images/generations", "POST"),
    ("https://api.openai.com/v1/audio/transcriptions", "POST"),
    ("https://api.openai.com/v1/files", "POST"),
    ("http://localhost:11434/api/embeddings", "POST"),
    ("http://localhost:11434/api/chat", "POST"),
    ("https://api.anthropic.com/v1/messages", "POST"),
    ("https://api.cohere.com/v2/chat", "POST"),
    ("https://example.com/v1/chat/completions", "POST"),
])
def test_other_exchanges_are_not_claimed(url: str, method: str) -> None:
    exchange = exchange_for(_case(url, method))
    assert oisp_exchange_decoder(exchange, DecoderSettings(), DecoderContext()) is None


def test_an_unknown_openai_path_falls_to_metadata_events_through_the_event_decoder() -> None:
    emitted: list[Event] = []
    decoder = EventDecoder(create_plugin_manager(entrypoints=False), emitted.append)
    exchange = exchange_for(_case("https://api.openai.com/v1/images/generations"))
    exchange.request.body += b'{"model": "gpt-image-1", "prompt": "a cat"}'
    name, _ = decoder.decoder_for(exchange)
    assert name == "oisp.providers.metadata"
    listener = decoder.exchange_listener(exchange.connection)
    listener.request(exchange)
    exchange.response = HttpResponse(200, "OK", "1.1", Headers([("content-type", "application/json")]), b"{}")
    listener.response_data(exchange, b"{}")
    listener.end(exchange)
    assert [e.event_type for e in emitted] == ["ai.request", "ai.response"]
    assert emitted[0].data.request_type == "other"  # type: ignore[attr-defined]
    assert emitted[0].confidence.completeness == "metadata_only"


def test_the_event_decoder_passes_its_settings_to_the_openai_plugin() -> None:
    emitted: list[Event] = []
    decoder = EventDecoder(create_plugin_manager(entrypoints=False), emitted.append,
                           settings=DecoderSettings(streaming_chunks=True))
    case = load("openai_chat_stream_parallel_tools")
    exchange = exchange_for(case)
    assert decoder.decoder_for(exchange)[0] == "oisp.providers.openai"
    listener = decoder.exchange_listener(exchange.connection)
    listener.request(exchange)
    exchange.response = HttpResponse(200, "OK", "1.1", Headers(case.response_headers))
    exchange.response.body += case.response_body
    listener.response_data(exchange, case.response_body)
    listener.end(exchange)
    types = [e.event_type for e in emitted]
    assert types.count("ai.streaming_chunk") == 7 and types[-3:] == ["ai.response", "agent.tool_call",
                                                                     "agent.tool_call"]
    default = EventDecoder(create_plugin_manager(entrypoints=False), emitted.append)
    assert default.settings.streaming_chunks is False


def test_every_fixture_is_claimed_by_the_openai_plugin_among_all_builtin_providers() -> None:
    decoder = EventDecoder(create_plugin_manager(entrypoints=False), lambda event: None)
    claimed = {name: decoder.decoder_for(exchange_for(load(name)))[0] for name in case_names()}
    assert set(claimed.values()) == {"oisp.providers.openai"}, claimed


def test_a_streamed_answer_without_an_sse_content_type_is_still_read_as_sse() -> None:
    case = load("ollama_v1_chat_stream")
    for headers in ([("content-type", "text/plain; charset=utf-8")], []):
        data: AiResponse = one(replay(evolve(case, response_headers=headers)), "ai.response").data
        assert data.tool_calls is not None and data.tool_calls[0].name == "bash"
        assert data.usage is not None and data.usage.total_tokens == 179


def test_an_error_inside_a_choice_of_a_whole_response_fails_it() -> None:
    case = load("fireworks_chat")
    body = json.loads(case.response_body)
    body["choices"][0].update(finish_reason="error", error={"code": 502, "message": "upstream overloaded"})
    data: AiResponse = one(replay(evolve(case, response_body=json.dumps(body).encode())), "ai.response").data
    assert data.success is False and data.finish_reason == "error"
    assert data.error is not None and (data.error.code, data.error.message) == ("502", "upstream overloaded")
