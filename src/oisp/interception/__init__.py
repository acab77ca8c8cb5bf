"""Transparent interception: divert outbound TCP connections to AI endpoints to the local proxy.

- :class:`Interceptor` diverts (pydivert: WinDivert on Windows, eBPF on Linux) and answers the proxy's
  original-destination lookups; configure it with :class:`InterceptorConfig` and a :class:`TargetSet`.
- :class:`OriginalDestinationSource` / :class:`OriginalDestination` (in :mod:`oisp.interception.protocol`,
  importable without pydivert) are the contract between the interceptor and the proxy.
- :func:`mark_upstream_socket` must be called by the proxy on each upstream socket before it connects.
"""

from oisp.interception._backend import mark_upstream_socket
from oisp.interception.dns import DnsRecord, DnsResponse, parse_dns_response
from oisp.interception.interceptor import LOOPBACK_MAX_SEGMENT, Interceptor, InterceptorConfig
from oisp.interception.protocol import Address, OriginalDestination, OriginalDestinationSource
from oisp.interception.targets import Target, TargetSet, parse_target

__all__ = [
    "LOOPBACK_MAX_SEGMENT",
    "Address",
    "DnsRecord",
    "DnsResponse",
    "Interceptor",
    "InterceptorConfig",
    "OriginalDestination",
    "OriginalDestinationSource",
    "Target",
    "TargetSet",
    "mark_upstream_socket",
    "parse_dns_response",
    "parse_target",
]
