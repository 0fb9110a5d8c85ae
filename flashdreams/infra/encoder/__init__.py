"""Encoder interfaces."""

from flashdreams.infra.encoder.base import (
    Encoder,
    EncoderConfig,
    NullEncoder,
    NullEncoderConfig,
    StreamingEncoder,
    StreamingEncoderCache,
    StreamingEncoderCacheT,
    StreamingVideoEncoder,
)

__all__ = [
    "Encoder",
    "EncoderConfig",
    "NullEncoder",
    "NullEncoderConfig",
    "StreamingEncoder",
    "StreamingEncoderCache",
    "StreamingEncoderCacheT",
    "StreamingVideoEncoder",
]
