"""Wan 2.2 transformer: a high-noise and a low-noise Wan 2.1 network switched by timestep."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flashdreams.core.distributed.plan import ParallelPlan, build_parallel_plan
from flashdreams.core.quantization import check_quantization_mode
from flashdreams.infra.diffusion.transformer import (
    Transformer,
    TransformerAutoregressiveCache,
    TransformerConfig,
)
from flashdreams.recipes.wan.transformer.wan21 import (
    Wan21Transformer,
    Wan21TransformerCache,
    Wan21TransformerConfig,
    check_loras_compose,
)


@dataclass(kw_only=True)
class Wan22TransformerCache(TransformerAutoregressiveCache):
    """Per-rollout state: one Wan 2.1 cache per branch."""

    high_noise: Wan21TransformerCache
    """Cache of the high-noise branch."""
    low_noise: Wan21TransformerCache
    """Cache of the low-noise branch."""

    def start(self, autoregressive_index: int) -> None:
        self.high_noise.start(autoregressive_index)
        self.low_noise.start(autoregressive_index)

    def finalize(self, autoregressive_index: int) -> None:
        self.high_noise.finalize(autoregressive_index)
        self.low_noise.finalize(autoregressive_index)

    def storage_bytes(self) -> int:
        return self.high_noise.storage_bytes() + self.low_noise.storage_bytes()


@dataclass(kw_only=True)
class Wan22TransformerConfig(TransformerConfig):
    """Config for the Wan 2.2 dual-network transformer.

    A timestep at or above ``boundary_ratio * num_train_timesteps`` goes to the
    high-noise branch, the rest to the low-noise branch (as upstream Wan 2.2 does). The branches must
    agree on everything that shapes the latent and the rollout. No CFG and
    no I2V here.
    """

    _target: type[Wan22Transformer] = field(default_factory=lambda: Wan22Transformer)
    """Always :class:`Wan22Transformer`."""
    transformer_high_noise: Wan21TransformerConfig = field(default_factory=Wan21TransformerConfig)
    """Sub-config for the high-noise branch (timestep >= boundary)."""
    transformer_low_noise: Wan21TransformerConfig = field(default_factory=Wan21TransformerConfig)
    """Sub-config for the low-noise branch (timestep < boundary)."""
    boundary_ratio: float = 0.875
    """Switch point as a fraction of ``num_train_timesteps``."""
    num_train_timesteps: int = 1000
    """Training timestep range of the scheduler."""
    quantization: str = "none"
    """Weight quantisation applied to both experts after their checkpoints load (values as
    :attr:`Wan21TransformerConfig.quantization`); ``"none"`` leaves each expert's own
    ``quantization`` field in charge."""
    kv_cache_dtype: str = "none"
    """KV-cache storage of both experts (values as :attr:`Wan21TransformerConfig.kv_cache_dtype`);
    ``"none"`` leaves each expert's own field in charge."""

    def __post_init__(self) -> None:
        high, low = self.transformer_high_noise, self.transformer_low_noise
        checks = {
            "network.patch_size": (high.network.patch_size, low.network.patch_size),
            "network.in_dim": (high.network.in_dim, low.network.in_dim),
            "network.out_dim": (high.network.out_dim, low.network.out_dim),
            "network.dim": (high.network.dim, low.network.dim),
            "batch_shape": (high.batch_shape, low.batch_shape),
            "len_t": (high.len_t, low.len_t),
            "window_size_t": (high.window_size_t, low.window_size_t),
            "sink_size_t": (high.sink_size_t, low.sink_size_t),
            "guidance_scale": (high.guidance_scale, low.guidance_scale),
        }
        for name, (high_value, low_value) in checks.items():
            if high_value != low_value:
                raise ValueError(
                    f"Wan 2.2 branches disagree on {name}: high-noise {high_value!r} vs "
                    f"low-noise {low_value!r}"
                )
        for branch_name, branch in (
            ("transformer_high_noise", high),
            ("transformer_low_noise", low),
        ):
            if branch.guidance_scale != 1.0:
                raise ValueError(
                    f"Wan22Transformer does not support CFG: {branch_name}.guidance_scale must be 1.0, "
                    f"got {branch.guidance_scale}"
                )
            if branch.stamp_image_latent or branch.concat_image_mask_to_latent:
                raise ValueError(
                    f"Wan22Transformer does not support I2V: {branch_name} enables "
                    "stamp_image_latent / concat_image_mask_to_latent"
                )
            if branch.network.cross_attn_enable_img:
                raise ValueError(
                    f"Wan22Transformer does not support I2V: {branch_name}.network.cross_attn_enable_img"
                )
        check_quantization_mode(self.quantization)
        for branch_name, branch in (
            ("transformer_high_noise", high),
            ("transformer_low_noise", low),
        ):
            if self.quantization != "none" and branch.quantization not in (
                "none",
                self.quantization,
            ):
                raise ValueError(
                    f"quantization={self.quantization} disagrees with "
                    f"{branch_name}.quantization={branch.quantization}"
                )
            check_loras_compose(branch.loras, self.quantization, where=f"{branch_name}.")
        if not 0.0 < self.boundary_ratio < 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {self.boundary_ratio}")

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * self.num_train_timesteps


class Wan22Transformer(Transformer[Wan22TransformerCache]):
    """Wan 2.2 dual-network DiT (high-noise and low-noise experts)."""

    def __init__(
        self, config: Wan22TransformerConfig, parallel: ParallelPlan | None = None
    ) -> None:
        super().__init__(config)
        self.config: Wan22TransformerConfig = config
        # One plan (process groups are created once) serves both branches.
        if parallel is None:
            parallel = build_parallel_plan()
        if parallel.cfg is not None:
            raise ValueError(
                "Wan22Transformer does not support CFG, so neither cfg_parallel: "
                "set parallel.cfg_parallel=false"
            )
        self.transformer_high_noise: Wan21Transformer = config.transformer_high_noise.setup(
            parallel=parallel
        )
        self.transformer_low_noise: Wan21Transformer = config.transformer_low_noise.setup(
            parallel=parallel
        )
        for expert in (self.transformer_high_noise, self.transformer_low_noise):
            expert.quantize_weights(config.quantization)
            if config.kv_cache_dtype != "none":
                expert.kv_cache_dtype = config.kv_cache_dtype

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Per-rank latent shape (both branches share it, checked by the config)."""
        return self.transformer_high_noise.latent_shape

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading batch dims of the latent (shared by the branches)."""
        return self.transformer_high_noise.batch_shape

    @property
    def len_t(self) -> int:
        """Latent frames per chunk (shared by the branches)."""
        return self.transformer_high_noise.len_t

    @property
    def guidance_scale(self) -> float:
        """Always 1.0: Wan 2.2 here has no CFG."""
        return 1.0

    @property
    def spatial_patch_size(self) -> tuple[int, int]:
        """``(kh, kw)`` (shared by the branches)."""
        return self.transformer_high_noise.spatial_patch_size

    def initialize_autoregressive_cache(
        self,
        *,
        height: int,
        width: int,
        text_embeddings: torch.Tensor,
        image_embeddings: torch.Tensor | None = None,
        **_unused: Any,
    ) -> Wan22TransformerCache:
        """Build both branches' caches from the same conditioning and spatial layout."""
        kwargs = dict(
            height=height,
            width=width,
            text_embeddings=text_embeddings,
            image_embeddings=image_embeddings,
        )
        return Wan22TransformerCache(
            high_noise=self.transformer_high_noise.initialize_autoregressive_cache(**kwargs),
            low_noise=self.transformer_low_noise.initialize_autoregressive_cache(**kwargs),
        )

    def select_branch(self, timestep: torch.Tensor) -> str:
        """``"high_noise"`` if the (largest) timestep is at or above the boundary, else ``"low_noise"``."""
        value = float(timestep.detach().float().max())
        return "high_noise" if value >= self.config.boundary_timestep else "low_noise"

    def predict_flow(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor,
        cache: Wan22TransformerCache,
        input: Any = None,
    ) -> torch.Tensor:
        """Predict the flow with the branch selected by ``timestep``."""
        if self.select_branch(timestep) == "high_noise":
            return self.transformer_high_noise.predict_flow(
                noisy_latent, timestep, cache.high_noise, input
            )
        return self.transformer_low_noise.predict_flow(
            noisy_latent, timestep, cache.low_noise, input
        )

    def finalize_kv_cache(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor,
        cache: Wan22TransformerCache,
        input: Any = None,
    ) -> None:
        """Write the context-noise K/V of this chunk into both branches' caches."""
        self.transformer_high_noise.finalize_kv_cache(
            noisy_latent, timestep, cache.high_noise, input
        )
        self.transformer_low_noise.finalize_kv_cache(noisy_latent, timestep, cache.low_noise, input)

    def switch_conditioning(
        self,
        cache: Wan22TransformerCache,
        *,
        recache: bool,
        text_embeddings: torch.Tensor | None = None,
        negative_text_embeddings: torch.Tensor | None = None,
    ) -> None:
        """Switch the text of both branches (see :meth:`Wan21Transformer.switch_conditioning`)."""
        for transformer, branch_cache in (
            (self.transformer_high_noise, cache.high_noise),
            (self.transformer_low_noise, cache.low_noise),
        ):
            transformer.switch_conditioning(
                branch_cache,
                recache=recache,
                text_embeddings=text_embeddings,
                negative_text_embeddings=negative_text_embeddings,
            )

    def patchify_and_maybe_split_cp(self, x: Any) -> Any:
        return self.transformer_high_noise.patchify_and_maybe_split_cp(x)

    def unpatchify_and_maybe_gather_cp(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.transformer_high_noise.unpatchify_and_maybe_gather_cp(x)

    def sample_noise(
        self,
        rng: torch.Generator | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
        in_unpatchified_shape: bool = False,
    ) -> torch.Tensor:
        return self.transformer_high_noise.sample_noise(
            rng, device=device, dtype=dtype, in_unpatchified_shape=in_unpatchified_shape
        )

    def sample_noise_like(self, x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        return self.transformer_high_noise.sample_noise_like(x, rng)
