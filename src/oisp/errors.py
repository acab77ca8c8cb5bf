"""The oisp exception hierarchy: every error oisp raises on purpose derives from :class:`OispError`."""

from __future__ import annotations

__all__ = [
    "CertificateError",
    "ConfigurationError",
    "EventValidationError",
    "InterceptionError",
    "OispError",
    "PluginError",
    "ProtocolError",
]


class OispError(Exception):
    """Base class of all errors raised by oisp; its message says what was wrong and how to fix it."""


class ConfigurationError(OispError, ValueError):
    """A configuration value is invalid: the message names the key, the value and what is allowed."""


class EventValidationError(OispError, ValueError):
    """An event (or a mapping read as one) does not have the shape OISP v0.1 requires."""


class PluginError(OispError):
    """A plugin could not be loaded, or a plugin-backed component (such as a sink) could not be created."""


class CertificateError(OispError):
    """The certificate authority or a certificate could not be created, loaded or used safely."""


class ProtocolError(OispError, ValueError):
    """Bytes on the wire do not follow the protocol they claim to (TLS, HTTP, a stream framing)."""


class InterceptionError(OispError):
    """Packet interception could not be started, or needs privileges the process does not have."""
