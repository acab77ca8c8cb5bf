"""oisp: see every AI API call a machine makes, as OISP v0.1 events.

The public API is what this module exports; everything under a leading underscore is private.
"""

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

__all__ = [
    "CertificateError",
    "ConfigurationError",
    "Event",
    "EventValidationError",
    "InterceptionError",
    "OispError",
    "PluginError",
    "ProtocolError",
    "__version__",
]
