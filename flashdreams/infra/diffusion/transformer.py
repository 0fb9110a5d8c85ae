"""Transformer interface: the flow-prediction network behind a diffusion model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

import torch
import torch.nn as nn
from typing_extensions import TypeVar

from flashdreams.infra.config import InstantiateConfig
from flashdreams.infra.diffusion.noise import NoiseSource, entry_shape, randn_entries


@dataclass(kw_only=True)
class TransformerAutoregressiveCache:
    """State kept across one AR rollout.

    Empty by default, which is right for non-AR transformers. Subclasses add
    fields and override :meth:`start` / :meth:`finalize` for bookkeeping.
    """

    noise_generators: list[torch.Generator] | None = None
    """Generators this rollout's noise is drawn from, one per rollout stacked in the batch
    (interactive sessions own one each, so several can run as one batch); ``None``: the
    diffusion model's ``rng`` (or the device's global generator)."""

    def start(self, autoregressive_index: int) -> None:
        """Called before the denoising steps of an AR step. No-op by default."""

    def finalize(self, autoregressive_index: int) -> None:
        """Called once the AR step's cache update is done. No-op by default."""

    def storage_bytes(self) -> int:
        """Bytes of device memory this cache holds (telemetry); 0 by default."""
        return 0


TransformerCacheT = TypeVar(
    "TransformerCacheT",
    bound=TransformerAutoregressiveCache,
    default=TransformerAutoregressiveCache,
)


class Transformer(nn.Module, ABC, Generic[TransformerCacheT]):
    """Flow-prediction transformer, generic over its AR cache type."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of the (patchified) latent this rank denoises, batch dims included."""

    @property
    def spatial_patch_size(self) -> tuple[int, int]:
        """``(height, width)`` latent cells per token; pixel sizes must be multiples of this
        times the decoder's spatial compression. ``(1, 1)`` unless a transformer patchifies."""
        return 1, 1

    @abstractmethod
    def predict_flow(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor,
        cache: TransformerCacheT,
        input: Any = None,
    ) -> torch.Tensor:
        """Predict the flow for ``noisy_latent`` at ``timestep``; same shape as the latent."""

    def finalize_kv_cache(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor,
        cache: TransformerCacheT,
        input: Any = None,
    ) -> None:
        """Advance the AR cache after the denoising loop.

        Default: one ``predict_flow`` forward whose output is discarded (the
        cache update is the side effect that matters).
        """
        self.predict_flow(noisy_latent, timestep, cache, input)

    def switch_conditioning(
        self, cache: TransformerCacheT, *, recache: bool, **context: Any
    ) -> None:
        """Replace the conditioning of a running rollout between two AR steps.

        ``context`` holds the new conditioning, named as in
        :meth:`initialize_autoregressive_cache`. ``recache=True`` also rebuilds
        the AR cache under it; ``False`` changes only what later steps see.
        Not supported by default.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not support switching the conditioning of a running rollout"
        )

    def initialize_autoregressive_cache(self, **context: Any) -> TransformerCacheT:
        """Fresh cache for a new rollout; the default is an empty cache."""
        return TransformerAutoregressiveCache()  # type: ignore[return-value]

    def postprocess_clean_latent(
        self,
        clean_latent: torch.Tensor,
        cache: TransformerCacheT,
        input: Any = None,
    ) -> torch.Tensor:
        """Hook applied to the loop's ``x0`` (e.g. I2V first-frame pinning). Identity by default."""
        return clean_latent

    @abstractmethod
    def patchify_and_maybe_split_cp(self, x: Any) -> Any:
        """Patchify (and CP-split) a latent or a structured encoder payload, keeping its type."""

    def can_batch_caches(self, caches: Sequence[TransformerCacheT]) -> bool:
        """Whether the rollouts of ``caches`` can run their next chunk as one batch
        (:meth:`concat_caches`). ``False`` unless a transformer supports batching."""
        return False

    def concat_caches(self, caches: Sequence[TransformerCacheT]) -> TransformerCacheT:
        """One cache that runs the next chunk of every rollout of ``caches`` as one batch,
        each rollout drawing from its own generator (``noise_generators``)."""
        raise NotImplementedError(f"{type(self).__name__} does not batch separate rollouts")

    def split_cache(self, cache: TransformerCacheT) -> list[TransformerCacheT]:
        """The rollouts' own caches back from :meth:`concat_caches`."""
        raise NotImplementedError(f"{type(self).__name__} does not batch separate rollouts")

    def sample_noise(
        self,
        rng: NoiseSource,
        *,
        device: torch.device,
        dtype: torch.dtype,
        in_unpatchified_shape: bool = False,
    ) -> torch.Tensor:
        """Draw this rank's initial noise in :attr:`latent_shape`.

        Context-parallel transformers override this (and
        :meth:`sample_noise_like`) so that every rank draws the same global
        tensor and keeps its own shard: a CP run then reproduces the
        single-process run for the same seed.
        """
        if in_unpatchified_shape:
            raise NotImplementedError(
                f"{type(self).__name__} does not support noise_in_unpatchified_shape=True"
            )
        return randn_entries(self.latent_shape, rng, device=device, dtype=dtype)

    def sample_noise_like(self, x: torch.Tensor, rng: NoiseSource) -> torch.Tensor:
        """Gaussian noise shaped like the patchified tensor ``x`` (scheduler re-noising);
        with one generator per batched rollout, each draws its own rows."""
        shape = entry_shape(tuple(x.shape), rng)
        return randn_entries(shape, rng, device=x.device, dtype=x.dtype)

    def unpatchify_and_maybe_gather_cp(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify_and_maybe_split_cp` for the clean latent. Identity by default."""
        return x


@dataclass(kw_only=True)
class TransformerConfig(InstantiateConfig):
    """Base of every transformer config."""

    _target: type[Transformer] = field(default_factory=lambda: Transformer)
    """Transformer class built by ``setup()``."""
