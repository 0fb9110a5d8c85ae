"""Wan VAE: streaming causal encoder / decoder for Wan 2.1 and Wan 2.2 TI2V 5B."""

from flashdreams.recipes.wan.autoencoder.vae import (
    Wan22TI2V5BVAEDecoderConfig,
    Wan22TI2V5BVAEEncoderConfig,
    WanVAECache,
    WanVAEDecoder,
    WanVAEDecoderConfig,
    WanVAEEncoder,
    WanVAEEncoderConfig,
    patchify_video,
    unpatchify_video,
    wan21_diffusers_vae_state_dict_transform,
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
    "patchify_video",
    "unpatchify_video",
    "wan21_diffusers_vae_state_dict_transform",
    "wan22_ti2v_5b_vae_state_dict_transform",
]
