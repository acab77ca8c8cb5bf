"""The TLS-intercepting proxy: explicit, transparent and reverse modes, byte-faithful relaying, passive
decoding of a copy."""

from oisp.proxy.config import ProxyConfig, ProxyMode, UpstreamOverride
from oisp.proxy.report import ConnectionReport, Decision, ProxyObserver, UpstreamCertificate
from oisp.proxy.server import MitmProxy, OriginalDestinationLookup, ProxyStats

__all__ = [
    "ConnectionReport",
    "Decision",
    "MitmProxy",
    "OriginalDestinationLookup",
    "ProxyConfig",
    "ProxyMode",
    "ProxyObserver",
    "ProxyStats",
    "UpstreamCertificate",
    "UpstreamOverride",
]
