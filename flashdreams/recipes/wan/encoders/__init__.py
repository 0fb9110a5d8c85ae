"""One-shot Wan conditioning encoders: UMT5 text encoder and CLIP image encoder."""

from flashdreams.recipes.wan.encoders.clip import CLIPImageEncoder, CLIPImageEncoderConfig
from flashdreams.recipes.wan.encoders.umt5 import (
    BUILTIN_BYTE_TOKENIZER,
    UMT5TextEncoder,
    UMT5TextEncoderConfig,
)

__all__ = [
    "BUILTIN_BYTE_TOKENIZER",
    "CLIPImageEncoder",
    "CLIPImageEncoderConfig",
    "UMT5TextEncoder",
    "UMT5TextEncoderConfig",
]
