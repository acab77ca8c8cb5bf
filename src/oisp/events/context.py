"""Envelope context objects: host, actor, process, app, web context, source, confidence, relations."""

from __future__ import annotations

from typing import Any

import attrs

from oisp.events._record import Record, extra_field

__all__ = [
    "Actor",
    "App",
    "Confidence",
    "Host",
    "ParentProcess",
    "ProcessInfo",
    "RelatedEvent",
    "Source",
    "TraceContext",
    "WebContext",
]



@attrs.frozen(kw_only=True)
class Host(Record):
    """The machine an event happened on."""

    hostname: str | None = None
    device_id: str | None = None
    os: str | None = None
    os_version: str | None = None
    arch: str | None = None
    kernel_version: str | None = None
    cloud: dict[str, Any] | None = None
    container: dict[str, Any] | None = None
    k8s: dict[str, Any] | None = None
    managed: bool | None = None
    tags: list[str] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class Actor(Record):
    """The user or identity behind an event."""

    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    groups: list[str] | None = None
    session_id: str | None = None
    terminal: str | None = None
    identity: dict[str, Any] | None = None
    service_account: dict[str, Any] | None = None
    auth_method: str | None = None
    is_elevated: bool | None = None
    is_human: bool | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ParentProcess(Record):
    """One ancestor of a process (its parent, or an entry of ``ancestors``)."""

    pid: int | None = None
    exe: str | None = None
    name: str | None = None
    cmdline: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ProcessInfo(Record):
    """The process that produced, or is associated with, an event."""

    pid: int | None = None
    ppid: int | None = None
    pgid: int | None = None
    sid: int | None = None
    exe: str | None = None
    name: str | None = None
    cmdline: str | None = None
    cmdline_args: list[str] | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    start_time: str | None = None
    bundle_id: str | None = None
    code_signature: dict[str, Any] | None = None
    hash: dict[str, str] | None = None
    parent: ParentProcess | None = None
    ancestors: list[ParentProcess] | None = None
    thread_id: int | None = None
    capabilities: Any = None
    container_id: str | None = None
    cgroup: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class App(Record):
    """The application (IDE, agent, chat app) that initiated AI traffic."""

    app_id: str | None = None
    name: str | None = None
    vendor: str | None = None
    version: str | None = None
    bundle_id: str | None = None
    category: str | None = None
    tier: str | None = None
    is_ai_app: bool | None = None
    is_ai_host: bool | None = None
    type: str | None = None
    subscription: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class WebContext(Record):
    """Origin, referer and user agent of browser-originated traffic."""

    origin: str | None = None
    referer: str | None = None
    user_agent: str | None = None
    web_app_id: str | None = None
    web_app_name: str | None = None
    web_app_type: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class Source(Record):
    """How and where an event was captured."""

    collector: str
    collector_version: str | None = None
    capture_method: str | None = None
    capture_point: str | None = None
    sensor_host: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class Confidence(Record):
    """What the collector knows and does not know about an event.

    ``completeness`` is ``partial`` for anything cut short (a truncated body, a reset stream), with the
    reason in ``limitations``.
    """

    level: str
    completeness: str
    reasons: list[str] | None = None
    missing: list[str] | None = None
    limitations: list[str] | None = None
    process_attribution: str | None = None
    content_source: str | None = None
    ai_detection_method: str | None = None
    sample_rate: float | None = None
    redaction_applied: bool | None = None
    redaction_profile: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class RelatedEvent(Record):
    """A link from one event to another (``parent``, ``child``, ``caused_by``, ``causes``, ``related``)."""

    event_id: str
    relationship: str
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class TraceContext(Record):
    """W3C trace context, for correlation with OpenTelemetry traces."""

    trace_id: str | None = None
    span_id: str | None = None
    trace_flags: int | None = None
    extra: dict[str, Any] = extra_field()
