"""Tiny seeded Wan 2.1 VAE, Wan 2.2 VAE and TAEHV decoders shared by the parallel-decode tests."""

from __future__ import annotations

import torch

from flashdreams.recipes.taehv import TeahvVAEDecoderConfig
from flashdreams.recipes.wan.autoencoder import Wan22TI2V5BVAEDecoderConfig, WanVAEDecoderConfig

_WAN_TINY = dict(checkpoint_path=None, use_cuda_graph=False)
_WAN_TINY.update(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


def build_tiny_decoder(kind: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """``kind``: ``"wan21"``, ``"wan22"`` or ``"taehv"``; the same weights on every rank."""
    torch.manual_seed(seed)
    if kind == "wan21":
        config = WanVAEDecoderConfig(
            **_WAN_TINY, dtype=dtype, z_dim=4, latent_mean=(0.1,) * 4, latent_std=(2.0,) * 4
        )
    elif kind == "wan22":
        config = Wan22TI2V5BVAEDecoderConfig(**_WAN_TINY, dtype=dtype, decoder_base_dim=16)
    elif kind == "taehv":
        config = TeahvVAEDecoderConfig(
            checkpoint_path=None,
            dtype=dtype,
            use_compile=False,
            use_cuda_graph=False,
            latent_channels=4,
            decoder_channels=(8, 8, 6, 4),
        )
    else:
        raise ValueError(f"unknown tiny decoder '{kind}'")
    decoder = config.setup().eval()
    if kind == "taehv":
        # Default init leaves most TAEHV outputs clamped at 0; widen the weights.
        with torch.no_grad():
            for parameter in decoder.parameters():
                parameter.mul_(2.0)
    return decoder


def latent_channels(kind: str) -> int:
    return 48 if kind == "wan22" else 4
