"""oisp: see every AI API call a machine makes, as OISP v0.1 events.

The public API is what this module exports; everything under a leading underscore is private. The composable
parts (:class:`MitmProxy`, :class:`Interceptor`, :class:`Attributor`, :class:`Decoder`, :class:`EventDecoder`,
:class:`DecoderProcess`, :class:`Pipeline`, :class:`CertificateAuthority`, :class:`Activity`) are imported on
first use, so ``import oisp`` stays cheap for plugins and scripts that only need events.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from oisp._version import __version__
from oisp.errors import (
    CertificateError,
    ConfigurationError,
    EventValidationError,
    InterceptionError,
    OispError,
    PluginError,
    ProtocolError,
)
from oisp.events import Event
from oisp.hookspecs import ExchangeDecoder, Sink, SinkFactory, hookimpl

if TYPE_CHECKING:
    from oisp.activity import Activity, ActivitySettings, AgentScope
    from oisp.attribution import Attribution, Attributor
    from oisp.capture import AICapture, capture_ai
    from oisp.config import Config
    from oisp.conversation import Call, Conversation, calls, conversations, read_events
    from oisp.decoder_process import DecoderProcess
    from oisp.endpoints import EndpointTable
    from oisp.event_decoder import Decoder, EventDecoder
    from oisp.interception import Interceptor, InterceptorConfig, TargetSet
    from oisp.pipeline import Pipeline
    from oisp.plugins import create_plugin_manager
    from oisp.proxy import MitmProxy, ProxyConfig, ProxyMode, UpstreamOverride
    from oisp.recorded import RecordedExchange, read_recording
    from oisp.tls import CertificateAuthority

#: Public name -> the module that defines it (imported when the name is first used).
_LAZY = {
    "Activity": "oisp.activity",
    "ActivitySettings": "oisp.activity",
    "AgentScope": "oisp.activity",
    "AICapture": "oisp.capture",
    "capture_ai": "oisp.capture",
    "Attribution": "oisp.attribution",
    "Attributor": "oisp.attribution",
    "Call": "oisp.conversation",
    "Conversation": "oisp.conversation",
    "calls": "oisp.conversation",
    "conversations": "oisp.conversation",
    "read_events": "oisp.conversation",
    "CertificateAuthority": "oisp.tls",
    "Config": "oisp.config",
    "DecoderProcess": "oisp.decoder_process",
    "EndpointTable": "oisp.endpoints",
    "TargetSet": "oisp.interception",
    "UpstreamOverride": "oisp.proxy",
    "Decoder": "oisp.event_decoder",
    "EventDecoder": "oisp.event_decoder",
    "RecordedExchange": "oisp.recorded",
    "read_recording": "oisp.recorded",
    "Interceptor": "oisp.interception",
    "InterceptorConfig": "oisp.interception",
    "MitmProxy": "oisp.proxy",
    "Pipeline": "oisp.pipeline",
    "ProxyConfig": "oisp.proxy",
    "ProxyMode": "oisp.proxy",
    "create_plugin_manager": "oisp.plugins",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'oisp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AICapture",
    "Activity",
    "ActivitySettings",
    "AgentScope",
    "Attribution",
    "Attributor",
    "Call",
    "CertificateAuthority",
    "CertificateError",
    "Config",
    "ConfigurationError",
    "Conversation",
    "Decoder",
    "DecoderProcess",
    "EndpointTable",
    "Event",
    "EventDecoder",
    "EventValidationError",
    "ExchangeDecoder",
    "InterceptionError",
    "Interceptor",
    "InterceptorConfig",
    "MitmProxy",
    "OispError",
    "Pipeline",
    "PluginError",
    "ProtocolError",
    "ProxyConfig",
    "ProxyMode",
    "RecordedExchange",
    "Sink",
    "SinkFactory",
    "TargetSet",
    "UpstreamOverride",
    "__version__",
    "calls",
    "capture_ai",
    "conversations",
    "create_plugin_manager",
    "hookimpl",
    "read_events",
    "read_recording",
]
