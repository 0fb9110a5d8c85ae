"""Decoder interfaces."""

from flashdreams.infra.decoder.base import (
    DecoderConfig,
    StreamingDecoder,
    StreamingDecoderCache,
    StreamingDecoderCacheT,
    StreamingVideoDecoder,
)

__all__ = [
    "DecoderConfig",
    "StreamingDecoder",
    "StreamingDecoderCache",
    "StreamingDecoderCacheT",
    "StreamingVideoDecoder",
]
