"""Test-only stand-in pipeline for the launcher tests (not a product slug).

It has the runner-facing surface of the Wan pipeline (``initialize_cache(text,
image, *, height, width)``, ``generate``, ``finalize``, ``decoder.spatial_compression_ratio``,
``diffusion_model.transformer.unpatchify_and_maybe_gather_cp``) and draws its
latents from torch's global RNG, so runs are reproducible from ``runner.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from flashdreams.infra.config import PrintableConfig
from flashdreams.infra.pipeline import StreamInferencePipelineConfig


@dataclass(kw_only=True)
class FakeSchedulerConfig(PrintableConfig):
    """Only here so tests can override a nested numeric field."""

    num_inference_steps: int = 4
    """Number of fake denoising iterations."""
    shift: float = 5.0
    """Unused; exercises float validation."""


@dataclass(kw_only=True)
class FakeDiffusionConfig(PrintableConfig):
    scheduler: FakeSchedulerConfig = field(default_factory=FakeSchedulerConfig)
    """Fake scheduler settings."""
    dtype: torch.dtype = torch.float32
    """Exercises dtype strings."""


@dataclass(kw_only=True)
class FakePipelineConfig(StreamInferencePipelineConfig):
    _target: type = field(default_factory=lambda: FakePipeline)
    """Built class."""
    diffusion_model: FakeDiffusionConfig = field(default_factory=FakeDiffusionConfig)
    """Fake diffusion settings."""
    latent_channels: int = 4
    """Latent channels."""
    frames_per_chunk: int = 3
    """Decoded frames per chunk."""
    spatial_compression_ratio: int = 8
    """Pixels per latent cell along H and W."""


class FakePipeline(nn.Module):
    def __init__(self, config: FakePipelineConfig, parallel: Any = None) -> None:
        super().__init__()
        self.config = config
        self.to_rgb = nn.Linear(config.latent_channels, 3)
        self.spatial_compression_ratio = config.spatial_compression_ratio
        self.spatial_patch_size = (1, 1)

    def initialize_cache(self, text: list[str], image: Any = None, *, height: int, width: int):
        return SimpleNamespace(height=height, width=width, final_state=None, text=text)

    @torch.no_grad()
    def generate(self, index: int, cache: Any) -> torch.Tensor:
        config = self.config
        latent = torch.randn(
            1, config.frames_per_chunk, config.latent_channels, cache.height, cache.width
        )
        for _ in range(config.diffusion_model.scheduler.num_inference_steps):
            latent = 0.9 * latent
        cache.final_state = SimpleNamespace(clean_latent=latent)
        rgb = self.to_rgb(latent.movedim(2, -1)).movedim(-1, 2).tanh()
        ratio = config.spatial_compression_ratio
        return rgb.repeat_interleave(ratio, dim=-2).repeat_interleave(ratio, dim=-1)

    def finalize(self, index: int, cache: Any) -> None:
        cache.final_state = None
        return None

    def clean_latent(self, cache: Any) -> torch.Tensor | None:
        return None if cache.final_state is None else cache.final_state.clean_latent

    def gather_clean_latent(self, cache: Any) -> torch.Tensor | None:
        return self.clean_latent(cache)
