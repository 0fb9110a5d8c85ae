"""TAEHV light video decoder (Tiny AutoEncoder for Hunyuan Video, Wan 2.1 ``lighttae`` weights)."""

from flashdreams.recipes.taehv.model import (
    AVAILABLE_TAEHV_CHECKPOINT_PATHS,
    TAEHVCache,
    TAEHVDecoderNetwork,
    TeahvVAEDecoder,
    TeahvVAEDecoderConfig,
    lighttae_state_dict_transform,
)

__all__ = [
    "AVAILABLE_TAEHV_CHECKPOINT_PATHS",
    "TAEHVCache",
    "TAEHVDecoderNetwork",
    "TeahvVAEDecoder",
    "TeahvVAEDecoderConfig",
    "lighttae_state_dict_transform",
]
