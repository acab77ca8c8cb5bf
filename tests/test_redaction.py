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
        **{name: text for name, text, _ in SECRET_SAMPLES},
    }
    from oisp.redaction import _DETECTORS

    assert set(samples) == {name for name, _ in _DETECTORS}  # a new detector needs a sample here
    for detector, secret in samples.items():
        _, found = Redactor().redact_text(f"prefix {secret} suffix")
        assert detector in [f["type"] for f in found], detector


def test_custom_patterns_with_group_references_still_match() -> None:
    redactor = Redactor(extra_patterns={"a": r"(x)AAA\1", "quoted": r"([\"'])TOKEN-\d+\1"})
    _, found = redactor.redact_text('config "TOKEN-1234" here')
    assert [f["type"] for f in found] == ["quoted"]


AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
#: (detector, text, the secret in it that must not survive): one sample for each built-in detector pattern.
SECRET_SAMPLES = [
    ("aws_secret_access_key", f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET),
    ("aws_secret_access_key", f'export AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"', AWS_SECRET),
    ("aws_secret_access_key", f"my keys are AKIAIOSFODNN7EXAMPLE and {AWS_SECRET}, thanks", AWS_SECRET),
    ("gcp_service_account_key", '{"type": "service_account", "private_key_id": "' + "3f" * 20 + '", '
     '"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBg\\n-----END PRIVATE KEY-----\\n"}', "3f" * 20),
    ("azure_connection_string", "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey="
     "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFy+/Q==;EndpointSuffix=core.windows.net",
     "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFy+/Q=="),
    ("azure_connection_string", "Endpoint=sb://acme.servicebus.windows.net/;SharedAccessKeyName=root;"
     "SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0=", "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0="),
    ("slack_token", "slack bot xoxb-2048-1024-AbCdEfGhIjKlMnOp", "xoxb-2048-1024-AbCdEfGhIjKlMnOp"),
    ("slack_token", "refresh xoxe-1-My0xLTEyMzQ1Njc4OTAtMTIz", "xoxe-1-My0xLTEyMzQ1Njc4OTAtMTIz"),
    ("slack_webhook", "post to https://hooks.slack.com/services/T0000AAAA/B0000BBBB/XXXXxxxxXXXXxxxxXXXXxxxx",
     "T0000AAAA/B0000BBBB/XXXXxxxxXXXXxxxxXXXXxxxx"),
    ("stripe_key", "stripe " + "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc"),
    ("stripe_key", "webhook " + "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("npm_token", "//registry.npmjs.org/:_authToken=npm_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
     "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
    ("pypi_token", "password = pypi-AgEIcHlwaS5vcmc" + "CJDk4ZTFiYjJjLWE3MzUtNDFhYi05NmQ3LTI1ZTQ2NWY2YmQ3MQ",
     "CJDk4ZTFiYjJjLWE3MzUtNDFhYi05NmQ3LTI1ZTQ2NWY2YmQ3MQ"),
    ("huggingface_token", "HF org token api_org_" + "kHnQbVxTzPqRsWmLcJdGfYeUaNiOpKjMhX",
     "kHnQbVxTzPqRsWmLcJdGfYeUaNiOpKjMhX"),
    ("database_url_password", "DATABASE_URL=postgresql://app:S3cr3t-P%40ss@db.internal:5432/app",
     "S3cr3t-P%40ss"),
    ("database_url_password", "mongodb+srv://admin:hunter2hunter2@cluster0.mongodb.net/test", "hunter2hunter2"),
    ("generic_secret_assignment", "client_secret: 'q8Zt2LmN4vXp9RwK7yB3'", "q8Zt2LmN4vXp9RwK7yB3"),
    ("generic_secret_assignment", "DB_PASSWORD=Tr0ub4dor&3xyz", "Tr0ub4dor&3xyz"),
    ("generic_secret_assignment", '"refresh_token": "1//0gLmT5vQx8RzKp2WnYd7HcJb"', "1//0gLmT5vQx8RzKp2WnYd7HcJb"),
]


@pytest.mark.parametrize(("detector", "text", "secret"), SECRET_SAMPLES)
def test_secret_shapes_of_well_known_scanners_are_redacted(detector: str, text: str, secret: str) -> None:
    prompt = f"Here is my config:\n{text}\nWhy does it fail?"
    event = Event.create(AiRequest(messages=[Message(role="user", content=prompt)]), confidence=CONF)
    content = Redactor()(event).to_dict()["data"]["messages"][0]["content"]
    assert secret not in content, content
    assert f"[REDACTED:{detector}:" in content
    assert content.startswith("Here is my config:") and content.endswith("Why does it fail?")


@pytest.mark.parametrize("text", [
    "Set max_tokens to 1000 and count the tokens in the prompt",
    "password: ${DB_PASSWORD}",
    "the token = abc",
    "secret: verylongbutonlyletters",
    "postgres://app@db.internal:5432/app (no password)",
    "see https://example.com/a:b@c for the sig=short docs",
    "git rev 3f786850e387550fdab836ed7e6dc881de23001b and AKIAIOSFODNN7EXAMPLE",
])
def test_ordinary_text_near_secret_words_is_kept(text: str) -> None:
    out, found = Redactor().redact_text(text)
    assert [f["type"] for f in found] in ([], ["aws_access_key_id"]), found
    if not found:
        assert out == text
