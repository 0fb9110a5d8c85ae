"""Wan VAE: streaming causal video encoder / decoder."""

from flashdreams.recipes.wan.autoencoder.layers import wan21_diffusers_vae_state_dict_transform
from flashdreams.recipes.wan.autoencoder.vae import (
    Wan22TI2V5BVAEDecoderConfig,
    Wan22TI2V5BVAEEncoderConfig,
    WanVAECache,
    WanVAEDecoder,
    WanVAEDecoderConfig,
    WanVAEEncoder,
    WanVAEEncoderConfig,
    wan22_ti2v_5b_vae_state_dict_transform,
)

__all__ = [
    "Wan22TI2V5BVAEDecoderConfig",
    "Wan22TI2V5BVAEEncoderConfig",
    "WanVAECache",
    "WanVAEDecoder",
    "WanVAEDecoderConfig",
    "WanVAEEncoder",
    "WanVAEEncoderConfig",
    "wan21_diffusers_vae_state_dict_transform",
    "wan22_ti2v_5b_vae_state_dict_transform",
]
