"""The OISP v0.1 event model: the :class:`Event` envelope, its context objects and typed payloads.

Every object is a frozen ``attrs`` class with ``to_dict()`` and ``from_dict()``; unset fields are ``None`` and
omitted from JSON, and keys the model does not know are kept in ``extra`` so foreign events round-trip.
"""

from oisp.events._record import Record
from oisp.events.agent import AgentInfo, AgentToolCall, AgentToolResult, ToolError, ToolInfo
from oisp.events.ai import (
    AiEmbedding,
    AiRequest,
    AiResponse,
    AiStreamingChunk,
    AuthInfo,
    Choice,
    ChunkDelta,
    Message,
    ModelInfo,
    ProviderInfo,
    Redacted,
    RedactionMarker,
    RequestParameters,
    ResponseError,
    ToolCall,
    ToolDefinition,
    Usage,
)
from oisp.events.context import (
    Actor,
    App,
    Confidence,
    Host,
    ParentProcess,
    ProcessInfo,
    RelatedEvent,
    Source,
    TraceContext,
    WebContext,
)
from oisp.events.encoder import EncodedEvent, EventEncoder
from oisp.events.envelope import (
    OISP_VERSION,
    PAYLOAD_TYPES,
    Event,
    UnknownPayload,
    format_ts,
    new_event_id,
    parse_ts,
)
from oisp.events.file import FileInfo, FileOpen, FileWrite
from oisp.events.network import CertificateInfo, DnsAnswer, Endpoint, NetworkConnect, NetworkDns, TlsInfo
from oisp.events.process import ProcessExec, ProcessExit

__all__ = [
    "OISP_VERSION",
    "PAYLOAD_TYPES",
    "Actor",
    "AgentInfo",
    "AgentToolCall",
    "AgentToolResult",
    "AiEmbedding",
    "AiRequest",
    "AiResponse",
    "AiStreamingChunk",
    "App",
    "AuthInfo",
    "CertificateInfo",
    "Choice",
    "ChunkDelta",
    "Confidence",
    "DnsAnswer",
    "EncodedEvent",
    "Endpoint",
    "Event",
    "EventEncoder",
    "FileInfo",
    "FileOpen",
    "FileWrite",
    "Host",
    "Message",
    "ModelInfo",
    "NetworkConnect",
    "NetworkDns",
    "ParentProcess",
    "ProcessExec",
    "ProcessExit",
    "ProcessInfo",
    "ProviderInfo",
    "Record",
    "Redacted",
    "RedactionMarker",
    "RelatedEvent",
    "RequestParameters",
    "ResponseError",
    "Source",
    "TlsInfo",
    "ToolCall",
    "ToolDefinition",
    "ToolError",
    "ToolInfo",
    "TraceContext",
    "UnknownPayload",
    "Usage",
    "WebContext",
    "format_ts",
    "new_event_id",
    "parse_ts",
]
