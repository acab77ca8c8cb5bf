"""The fallback provider: any exchange with an AI endpoint that no provider plugin claims still yields
metadata-level ``ai.request`` and ``ai.response`` events (:class:`~oisp.provider_kit.MetadataDecoder`).
Registered last, so every specific provider is asked first."""

from __future__ import annotations

from oisp.hookspecs import ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import MetadataDecoder

__all__ = ["oisp_exchange_decoder"]


@hookimpl(trylast=True)
def oisp_exchange_decoder(exchange: HttpExchange) -> ExchangeDecoder | None:
    return MetadataDecoder()
