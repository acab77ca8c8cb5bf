"""Every event oisp defines validates against the official OISP v0.1 schemas, also after spec-gap mapping."""

from __future__ import annotations

import pytest
from tests.events.samples import ALL
from tests.oisp_schema import SchemaValidator

from oisp.events import (
    AgentToolResult,
    AiRequest,
    AiResponse,
    Choice,
    Confidence,
    Event,
    Message,
    ProviderInfo,
    ToolCall,
    ToolDefinition,
)
from oisp.events.spec_gaps import ORIGINAL_KEY, conform
from oisp.redaction import Redactor

CONF = Confidence(level="high", completeness="full")


@pytest.mark.parametrize("event_type", sorted(ALL))
def test_sample_event_of_every_type_validates(event_type: str, oisp_schema: SchemaValidator) -> None:
    oisp_schema.assert_valid(conform(ALL[event_type]()).to_dict())


def test_the_validator_itself_rejects_invalid_events(oisp_schema: SchemaValidator) -> None:
    bad = ALL["ai.request"]().to_dict()
    bad["data"]["provider"]["name"] = "deepseek"
    bad["unexpected"] = 1
    errors = oisp_schema.errors(bad)
    assert any("unexpected" in e for e in errors)
    assert any("deepseek" in e for e in errors)


def test_values_outside_the_schema_are_mapped_and_originals_kept(oisp_schema: SchemaValidator) -> None:
    parts = [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": "sha256:ab"}}]
    event = Event.create(
        AiRequest(
            provider=ProviderInfo(name="deepseek"),
            request_type="rerank",
            messages=[Message(role="developer", content="be brief"), Message(role="user", content=parts)],  # type: ignore[arg-type]
            tools=[ToolDefinition(name="web", type="web_search_preview")],
            tool_choice={"type": "function", "function": {"name": "web"}},  # type: ignore[arg-type]
        ),
        confidence=CONF,
    )
    mapped = conform(event)
    out = mapped.to_dict()
    oisp_schema.assert_valid(out)
    assert out["data"]["provider"]["name"] == "other"
    assert out["data"]["messages"][0]["role"] == "system"
    assert out["data"]["messages"][1]["content"] == "look at"
    assert out["data"]["request_type"] == "other"
    original = out["attrs"][ORIGINAL_KEY]
    assert original["data.provider.name"] == "deepseek"
    assert original["data.messages[0].role"] == "developer"
    assert original["data.messages[1].content"] == parts
    assert original["data.tools[0].type"] == "web_search_preview"
    assert original["data.request_type"] == "rerank"
    assert original["data.tool_choice"]["function"]["name"] == "web"


def test_finish_reasons_outside_the_enum_become_other(oisp_schema: SchemaValidator) -> None:
    event = Event.create(AiResponse(finish_reason="end_turn",
                                    choices=[Choice(index=0, finish_reason="max_tokens")]), confidence=CONF)
    out = conform(event).to_dict()
    oisp_schema.assert_valid(out)
    assert out["data"]["finish_reason"] == "other"
    assert out["attrs"][ORIGINAL_KEY]["data.choices[0].finish_reason"] == "max_tokens"


def test_redacted_tool_arguments_and_results_validate(oisp_schema: SchemaValidator) -> None:
    secret = "sk-proj-" + "a1B2c3D4e5" * 4
    response = Event.create(AiResponse(tool_calls=[ToolCall(id="c1", name="login", arguments=secret)]),
                            confidence=CONF)
    result = Event.create(AgentToolResult(call_id="c1", result=secret), confidence=CONF)
    for event in (response, result):
        out = conform(Redactor()(event)).to_dict()
        oisp_schema.assert_valid(out)
        assert secret not in str(out)
        assert any("$redacted" in str(v) for v in out["attrs"][ORIGINAL_KEY].values())


def test_metadata_only_profile_validates(oisp_schema: SchemaValidator) -> None:
    for factory in ALL.values():
        out = conform(Redactor(profile="metadata-only")(factory())).to_dict()
        oisp_schema.assert_valid(out)


def test_conform_leaves_valid_events_untouched() -> None:
    event = ALL["ai.response"]()
    assert conform(event) is event


def test_the_public_validator_raises_with_every_violation(oisp_schema: SchemaValidator) -> None:
    from tests.oisp_schema import SCHEMA_DIR

    from oisp.errors import ConfigurationError, EventValidationError
    from oisp.events.validation import SchemaValidator as PublicValidator

    validator = PublicValidator(SCHEMA_DIR)
    validator.validate(conform(ALL["agent.tool_call"]()))
    bad = ALL["ai.request"]().to_dict()
    bad["data"]["request_type"] = "poetry"
    with pytest.raises(EventValidationError, match="poetry"):
        validator.validate(bad)
    with pytest.raises(ConfigurationError, match="envelope.schema.json"):
        PublicValidator(SCHEMA_DIR.parent)
