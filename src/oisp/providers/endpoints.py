"""Declares the built-in table of AI endpoints through the ``oisp_endpoints`` hook."""

from __future__ import annotations

from collections.abc import Iterable

from oisp.endpoints import BUILTIN_ENDPOINTS
from oisp.hookspecs import EndpointSpec, hookimpl


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return BUILTIN_ENDPOINTS
