"""Wan 2.1 / 2.2 recipes: DiT transformers, VAE, text / image encoders, I2V control, pipeline."""

from flashdreams.recipes.wan.autoencoder import *  # noqa: F403
from flashdreams.recipes.wan.autoencoder import __all__ as _autoencoder_all
from flashdreams.recipes.wan.encoders import (
    CLIPImageEncoder,
    CLIPImageEncoderConfig,
    UMT5TextEncoder,
    UMT5TextEncoderConfig,
)
from flashdreams.recipes.wan.i2v_encoder import I2VCtrlEncoder, WanI2VCtrlEncoderConfig
from flashdreams.recipes.wan.pipeline import (
    WanInferencePipeline,
    WanInferencePipelineCache,
    WanInferencePipelineConfig,
)
from flashdreams.recipes.wan.transformer import *  # noqa: F403
from flashdreams.recipes.wan.transformer import __all__ as _transformer_all

__all__ = [
    *_autoencoder_all,
    *_transformer_all,
    "CLIPImageEncoder",
    "CLIPImageEncoderConfig",
    "I2VCtrlEncoder",
    "UMT5TextEncoder",
    "UMT5TextEncoderConfig",
    "WanI2VCtrlEncoderConfig",
    "WanInferencePipeline",
    "WanInferencePipelineCache",
    "WanInferencePipelineConfig",
]
