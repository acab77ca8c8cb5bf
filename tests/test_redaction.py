"""Secrets never reach an event: headers, URLs, API keys and secret-looking content."""

from __future__ import annotations

import hashlib

import pytest

from oisp.errors import ConfigurationError
from oisp.events import AgentToolCall, AiRequest, Confidence, Event, Message, ProcessInfo, ToolInfo
from oisp.redaction import REDACTED, Redactor, key_fingerprint, redact_headers, redact_url

CONF = Confidence(level="high", completeness="full")
OPENAI_KEY = "sk-proj-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv"
ANTHROPIC_KEY = "sk-ant-api03-" + "x" * 40
PEM = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBy7\nabc==\n-----END EC PRIVATE KEY-----"


@pytest.mark.parametrize(
    "name",
    ["Authorization", "x-api-key", "api-key", "x-goog-api-key", "Cookie", "Set-Cookie", "X-Amz-Security-Token",
     "Proxy-Authorization", "anthropic-secret-thing"],
)
def test_credential_headers_are_redacted(name: str) -> None:
    out = redact_headers([(name, "secret-value-123"), ("content-type", "application/json")])
    assert out == [(name, REDACTED), ("content-type", "application/json")]


def test_aws_sigv4_authorization_is_redacted_entirely() -> None:
    sig = "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/bedrock/aws4_request, Signature=ab"
    assert redact_headers([("Authorization", sig)]) == [("Authorization", REDACTED)]


def test_key_query_parameters_and_userinfo_are_redacted() -> None:
    url = "https://user:pw@generativelanguage.googleapis.com/v1beta/models/g:generateContent?key=AIzaSyA&alt=sse"
    out = redact_url(url)
    assert "AIzaSyA" not in out and "pw" not in out
    assert ("alt=sse" in out and "key=%5BREDACTED%5D" in out) or "key=[REDACTED]" in out


@pytest.mark.parametrize(
    ("key", "prefix"),
    [(OPENAI_KEY, "sk-proj-"), (ANTHROPIC_KEY, "sk-ant-"), ("AIza" + "B" * 35, "AIza"),
     ("Bearer " + OPENAI_KEY, "sk-proj-"), ("opaque-token-without-known-prefix", "")],
)
def test_api_keys_are_kept_only_as_public_prefix_and_sha256(key: str, prefix: str) -> None:
    fp = key_fingerprint(key)
    bare = key.removeprefix("Bearer ")
    assert fp.prefix == prefix
    assert fp.hash == "sha256:" + hashlib.sha256(bare.encode()).hexdigest()
    assert len(fp.prefix) <= 8


def test_secret_inside_a_prompt_is_replaced_in_place_and_the_prompt_kept() -> None:
    event = Event.create(AiRequest(messages=[Message(role="user", content=f"use {OPENAI_KEY} to call it")]),
                         confidence=CONF)
    out = Redactor()(event).to_dict()
    content = out["data"]["messages"][0]["content"]
    assert OPENAI_KEY not in content
    assert content.startswith("use [REDACTED:openai_api_key:") and content.endswith(" to call it")
    assert out["confidence"]["redaction_applied"] is True


@pytest.mark.parametrize(("secret", "detector"), [(OPENAI_KEY, "openai_api_key"), (PEM, "private_key"),
                                                  ("Bearer abcdefghijklmnopqrstuvwxyz", "bearer_token"),
                                                  (ANTHROPIC_KEY, "anthropic_api_key")])
def test_content_that_is_a_secret_becomes_a_marker_with_reason_length_and_hash(secret: str, detector: str) -> None:
    event = Event.create(AiRequest(messages=[Message(role="user", content=secret)]), confidence=CONF)
    content = Redactor()(event).to_dict()["data"]["messages"][0]["content"]
    marker = content["$redacted"]
    assert marker["reason"] == "secret_detected"
    assert marker["detector"] == detector
    assert marker["original_length"] == len(secret)
    assert marker["hash"] == "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def test_private_key_in_a_tool_argument_and_cmdline_is_redacted() -> None:
    event = Event.create(
        AgentToolCall(tool=ToolInfo(name="write_file"), arguments={"path": "id_ec", "content": PEM,
                                                                   "api_key": "anything"}),
        confidence=CONF, process=ProcessInfo(pid=1, cmdline=f"python agent.py --key {OPENAI_KEY}"),
    )
    out = Redactor()(event).to_dict()
    text = str(out)
    assert "MHcCAQEEIBy7" not in text and OPENAI_KEY not in text and "anything" not in text
    assert out["data"]["arguments"]["path"] == "id_ec"


def test_clean_events_are_returned_unchanged() -> None:
    event = Event.create(AiRequest(messages=[Message(role="user", content="hello")]), confidence=CONF)
    assert Redactor()(event) is event


def test_metadata_only_profile_replaces_all_message_and_tool_content() -> None:
    event = Event.create(
        AiRequest(messages=[Message(role="user", content="my diagnosis is private")]), confidence=CONF)
    out = Redactor(profile="metadata-only")(event).to_dict()
    marker = out["data"]["messages"][0]["content"]["$redacted"]
    assert marker["reason"] == "metadata_only" and marker["original_length"] == 23
    assert "diagnosis" not in str(out)
    assert out["confidence"]["redaction_profile"] == "metadata-only"


def test_unknown_profile_and_bad_pattern_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="redaction.profile"):
        Redactor(profile="none")
    with pytest.raises(ConfigurationError, match="redaction.patterns.mine"):
        Redactor(extra_patterns={"mine": "("})


def test_custom_patterns_are_applied() -> None:
    event = Event.create(AiRequest(messages=[Message(role="user", content="ticket ACME-SECRET-1234 x")]),
                         confidence=CONF)
    out = Redactor(extra_patterns={"acme": r"ACME-SECRET-\d+"})(event).to_dict()
    assert "ACME-SECRET-1234" not in str(out)


def test_every_builtin_detector_is_reached_by_the_literal_prefilter() -> None:
    # A secret of each kind must pass the cheap substring check that guards the regular expressions.
    samples = {
        "openai_api_key": OPENAI_KEY, "anthropic_api_key": ANTHROPIC_KEY, "private_key": PEM,
        "google_api_key": "AIza" + "B" * 35, "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE",
        "github_token": "ghp_" + "a" * 36, "slack_token": "xoxb-" + "1" * 12, "huggingface_token": "hf_" + "a" * 30,
        "groq_api_key": "gsk_" + "a" * 40, "xai_api_key": "xai-" + "a" * 40, "replicate_token": "r8_" + "a" * 30,
        "perplexity_api_key": "pplx-" + "a" * 40, "jwt": "eyJ" + "a" * 12 + ".eyJ" + "b" * 12 + "." + "c" * 12,
        "bearer_token": "BeArEr " + "z" * 20,
    }
    from oisp.redaction import _DETECTORS

    assert set(samples) == {name for name, _ in _DETECTORS}  # a new detector needs a sample here
    for detector, secret in samples.items():
        _, found = Redactor().redact_text(f"prefix {secret} suffix")
        assert [f["type"] for f in found] == [detector], detector


def test_custom_patterns_with_group_references_still_match() -> None:
    redactor = Redactor(extra_patterns={"a": r"(x)AAA\1", "quoted": r"([\"'])TOKEN-\d+\1"})
    _, found = redactor.redact_text('config "TOKEN-1234" here')
    assert [f["type"] for f in found] == ["quoted"]
