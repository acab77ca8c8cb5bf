"""Decoding in a separate process: the relay hands copies over a socket pair, and never shares a core (or the
GIL) with decoding, events, redaction and sinks.

The proxy process runs :class:`DecoderProcess` as its observer; the decoder process
(:mod:`oisp.decoder_process.worker`) builds the configured pipeline and decodes. The framing between them is in
:mod:`oisp.decoder_process.wire`. The original Windows sensor had the same split (a redirector and proxy, and an
event processor behind a named pipe).
"""

from oisp.decoder_process.parent import DEFAULT_BUFFER, DecoderProcess, DecoderProcessStats, RemoteFeed

__all__ = ["DEFAULT_BUFFER", "DecoderProcess", "DecoderProcessStats", "RemoteFeed"]
