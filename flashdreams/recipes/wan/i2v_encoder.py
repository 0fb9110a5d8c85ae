"""I2V control encoder: the first frame, VAE-encoded chunk by chunk, plus its mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flashdreams.infra.encoder import EncoderConfig, StreamingEncoderCache, StreamingVideoEncoder
from flashdreams.recipes.wan.autoencoder import WanVAECache, WanVAEEncoderConfig
from flashdreams.recipes.wan.transformer import I2VCtrl

NUM_MASK_CHANNELS = 4
"""Wan 2.1 I2V mask channels: one per pixel frame folded into a latent frame."""


@dataclass(kw_only=True)
class I2VCtrlEncoderCache(StreamingEncoderCache):
    """Rollout state: the streaming VAE cache and the chunk length in latent frames."""

    vae_cache: WanVAECache
    """Causal-conv cache of the inner VAE encoder."""
    num_latent_frames: int
    """Latent frames per AR chunk (the transformer's ``len_t``)."""


class I2VCtrlEncoder(StreamingVideoEncoder[I2VCtrlEncoderCache]):
    """Turns the I2V first frame into one :class:`I2VCtrl` per AR step.

    The conditioning video is the first frame followed by black (zero) frames,
    as upstream Wan I2V builds it; it is VAE-encoded one chunk per AR step
    through the streaming cache, so chunk ``i`` sees exactly the latents a
    one-shot encode of the whole padded video would give. The mask is 1 on
    the first latent frame (all 4 channels) and 0 elsewhere.
    """

    def __init__(self, config: WanI2VCtrlEncoderConfig) -> None:
        super().__init__(config)
        self.vae = config.encoder.setup()

    @property
    def spatial_compression_ratio(self) -> int:
        return self.vae.spatial_compression_ratio

    @property
    def temporal_compression_ratio(self) -> int:
        return self.vae.temporal_compression_ratio

    def get_output_temporal_size(self, autoregressive_index: int, input_temporal_size: int) -> int:
        return self.vae.get_output_temporal_size(autoregressive_index, input_temporal_size)

    def get_input_temporal_size(self, autoregressive_index: int, output_temporal_size: int) -> int:
        return self.vae.get_input_temporal_size(autoregressive_index, output_temporal_size)

    def initialize_autoregressive_cache(
        self, *, num_latent_frames: int = 1, **_unused: Any
    ) -> I2VCtrlEncoderCache:
        return I2VCtrlEncoderCache(
            vae_cache=self.vae.initialize_autoregressive_cache(),
            num_latent_frames=num_latent_frames,
        )

    def forward(
        self,
        input: torch.Tensor,
        autoregressive_index: int = 0,
        cache: I2VCtrlEncoderCache | None = None,
    ) -> I2VCtrl:
        """``input``: first frame ``[*batch, 1, 3, H, W]`` in [-1, 1] -> this chunk's control."""
        if cache is None:
            cache = self.initialize_autoregressive_cache()
        num_pixel_frames = self.get_input_temporal_size(
            autoregressive_index, cache.num_latent_frames
        )
        # Shape legend: B* batch dims, F pixel frames, T latent frames.
        frame = input.to(self.vae_dtype)
        video = frame.new_zeros(*frame.shape[:-4], num_pixel_frames, *frame.shape[-3:])
        if autoregressive_index == 0:
            video[..., :1, :, :, :] = frame
        latent = self.vae(video, autoregressive_index, cache.vae_cache)  # [*B, T, C, h, w]
        mask = latent.new_zeros(*latent.shape[:-3], NUM_MASK_CHANNELS, *latent.shape[-2:])
        if autoregressive_index == 0:
            mask[..., :1, :, :, :] = 1.0
        return I2VCtrl(latent=latent, mask=mask)

    @property
    def vae_dtype(self) -> torch.dtype:
        for parameter in self.vae.parameters():
            return parameter.dtype
        return torch.float32


@dataclass(kw_only=True)
class WanI2VCtrlEncoderConfig(EncoderConfig):
    """Config of the I2V control encoder."""

    _target: type[I2VCtrlEncoder] = field(default_factory=lambda: I2VCtrlEncoder)
    """Always :class:`I2VCtrlEncoder`."""
    encoder: WanVAEEncoderConfig = field(default_factory=WanVAEEncoderConfig)
    """Streaming Wan VAE encoder; use the same checkpoint as the pipeline's decoder."""
