"""Diffusion model: a transformer (flow predictor) driven by a scheduler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic

import torch
import torch.nn as nn
from typing_extensions import TypeVar

from flashdreams.core.distributed.plan import ParallelPlan
from flashdreams.infra.config import InstantiateConfig
from flashdreams.infra.diffusion.noise import NoiseSource
from flashdreams.infra.diffusion.scheduler.base import Scheduler, SchedulerConfig
from flashdreams.infra.diffusion.transformer import (
    Transformer,
    TransformerAutoregressiveCache,
    TransformerCacheT,
    TransformerConfig,
)

_FinalStateCacheT = TypeVar(
    "_FinalStateCacheT",
    bound=TransformerAutoregressiveCache,
    default=TransformerAutoregressiveCache,
)


@dataclass(kw_only=True)
class FinalState(Generic[_FinalStateCacheT]):
    """What ``DiffusionModel.generate`` hands to ``DiffusionModel.finalize``."""

    clean_latent: torch.Tensor
    """Patchified (per-rank) clean latent of this AR step."""
    autoregressive_index: int
    """AR step that produced ``clean_latent``."""
    cache: _FinalStateCacheT
    """Long-lived AR cache used during generation."""
    input: Any = None
    """Patchified encoder output of this AR step (``None`` without an encoder)."""


@dataclass(kw_only=True)
class DiffusionModelConfig(InstantiateConfig):
    """Config for the autoregressive diffusion model."""

    _target: type[DiffusionModel] = field(default_factory=lambda: DiffusionModel)
    """Always :class:`DiffusionModel`."""
    transformer: TransformerConfig
    """Flow-prediction network config."""
    scheduler: SchedulerConfig
    """Denoising-loop config."""
    seed: int | None = None
    """Seed of the model's own RNG for initial noise and scheduler draws; ``None`` uses the global RNG."""
    context_noise: int = 0
    """Timestep at which the clean latent is re-noised before the KV-cache update in ``finalize``; 0 feeds it clean."""
    noise_in_unpatchified_shape: bool = False
    """Draw initial noise in the unpatchified video-latent shape and patchify it (matches recipes that do so)."""


class DiffusionModel(nn.Module, Generic[TransformerCacheT]):
    """Scheduler + transformer: ``generate`` maps noise to one chunk's clean latent."""

    FinalState = FinalState

    def __init__(self, config: DiffusionModelConfig, parallel: ParallelPlan | None = None) -> None:
        super().__init__()
        self.config = config
        # The run's parallel plan goes to the transformer; None lets it detect the world.
        transformer_kwargs = {} if parallel is None else {"parallel": parallel}
        self.transformer: Transformer[TransformerCacheT] = config.transformer.setup(
            **transformer_kwargs
        )
        self.scheduler: Scheduler = config.scheduler.setup()
        self._rng: torch.Generator | None = None
        self._rng_device: torch.device | None = None
        self.before_denoising_step: Callable[[int, int], None] | None = None
        """Called as ``(autoregressive_index, step_index)`` before each transformer call of the
        denoising loop; the runner checks stop requests there. ``None``: nothing is called."""

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.transformer.parameters():
            return tensor.dtype
        return torch.float32

    @property
    def rng(self) -> torch.Generator | None:
        """Per-model generator on the current device (``None`` when ``seed`` is ``None``).

        Built on first use and rebuilt, re-seeded, after a device move.
        """
        if self.config.seed is None:
            return None
        device = self.device
        if self._rng is None or self._rng_device != device:
            self._rng = torch.Generator(device=device)
            self._rng.manual_seed(self.config.seed)
            self._rng_device = device
        return self._rng

    def noise_source(self, cache: TransformerCacheT) -> NoiseSource:
        """Where a rollout's draws come from: its cache's own generators, else :attr:`rng`."""
        if cache.noise_generators is not None:
            return cache.noise_generators
        return self.rng

    def reset_rng(self) -> None:
        """Re-seed :attr:`rng` on its next use (a new rollout then draws the same noise)."""
        self._rng = None

    @torch.no_grad()
    def generate(
        self,
        autoregressive_index: int,
        cache: TransformerCacheT,
        input: Any = None,
    ) -> tuple[torch.Tensor, FinalState[TransformerCacheT]]:
        """Denoise one AR step; returns (unpatchified clean latent, final state)."""
        transformer = self.transformer
        cache.start(autoregressive_index)
        patched_input = (
            transformer.patchify_and_maybe_split_cp(input) if input is not None else None
        )
        rng = self.noise_source(cache)
        noise = transformer.sample_noise(
            rng,
            device=self.device,
            dtype=self.dtype,
            in_unpatchified_shape=self.config.noise_in_unpatchified_shape,
        )

        num_steps_done = 0

        def predict_flow(noisy_latent: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            nonlocal num_steps_done
            if self.before_denoising_step is not None:
                self.before_denoising_step(autoregressive_index, num_steps_done)
            num_steps_done += 1
            return transformer.predict_flow(noisy_latent, timestep, cache, patched_input)

        clean = self.scheduler.sample(
            initial_noise=noise,
            predict_flow=predict_flow,
            rng=rng,
            noise_like=transformer.sample_noise_like,
        )
        clean = transformer.postprocess_clean_latent(clean, cache, patched_input)
        final_state = FinalState(
            clean_latent=clean,
            autoregressive_index=autoregressive_index,
            cache=cache,
            input=patched_input,
        )
        return transformer.unpatchify_and_maybe_gather_cp(clean), final_state

    @torch.no_grad()
    def finalize(self, final_state: FinalState[TransformerCacheT]) -> None:
        """Write this AR step into the cache: re-noise to ``context_noise`` and run the transformer.

        ``context_noise == 0`` feeds the clean latent directly (no ``add_noise``,
        which also spares schedulers without a t=0 entry).
        """
        clean = final_state.clean_latent
        context_noise = self.config.context_noise
        timestep = torch.tensor(float(context_noise), device=clean.device)
        if context_noise == 0:
            latent = clean
        else:
            latent = self.scheduler.add_noise(
                clean_input=clean,
                timestep=timestep,
                rng=self.noise_source(final_state.cache),
                noise_like=self.transformer.sample_noise_like,
            )
        self.transformer.finalize_kv_cache(latent, timestep, final_state.cache, final_state.input)
        final_state.cache.finalize(final_state.autoregressive_index)
