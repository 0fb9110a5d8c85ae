"""Wan VAE encoder / decoder (Wan 2.1 layout) as streaming video codecs with a per-rollout cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger

from flashdreams.core.checkpoint import load_checkpoint, load_state_dict_into_module
from flashdreams.infra.decoder import DecoderConfig, StreamingDecoderCache, StreamingVideoDecoder
from flashdreams.infra.encoder import EncoderConfig, StreamingEncoderCache, StreamingVideoEncoder
from flashdreams.recipes.wan.autoencoder.layers import (
    FeatureCache,
    WanVAE,
)

WAN21_VAE_URL = "https://huggingface.co/lightx2v/Autoencoders/resolve/main/Wan2.1_VAE.pth"
WAN22_VAE_URL = (
    "https://huggingface.co/Wan-AI/Wan2.2-TI2V-5B-Diffusers/resolve/main/vae/"
    "diffusion_pytorch_model.safetensors"
)
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916,
)  # fmt: skip
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
    0.2813, 0.0891, 0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
    0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
    -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344,
    0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
    0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
    0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


@dataclass(kw_only=True)
class WanVAECache(StreamingEncoderCache, StreamingDecoderCache):
    """Causal-conv frames carried from one AR step to the next (encoder or decoder side)."""

    features: FeatureCache | None = None
    """Per-conv cached frames; built on the first call."""
    num_calls: int = 0
    """Chunks processed so far; the first one is encoded/decoded with the causal first frame."""


@dataclass(kw_only=True)
class _WanVAEFields:
    checkpoint_path: str | None = WAN21_VAE_URL
    """Local ``.pth`` / ``.safetensors`` file or diffusers folder; ``None`` = random init (tests, demos).
    Remote addresses are refused with a message saying where to put the file."""
    dtype: torch.dtype = torch.bfloat16
    """Weights and compute dtype."""
    use_cuda_graph: bool = True
    """Capture the steady-state call in a CUDA graph (CUDA only; see the class docstring)."""
    use_compile: bool = False
    """``torch.compile`` the conv stacks (CUDA only); Inductor autotuning can cost GiBs of transient memory."""
    base_dim: int = 96
    """Base channel count: 96 for Wan 2.1, 160 for Wan 2.2 TI2V 5B."""
    z_dim: int = 16
    """Latent channels."""
    patch_size: int = 1
    """Pixel packing before the encoder (2 for Wan 2.2 TI2V 5B)."""
    is_residual: bool = False
    """Wan 2.2 residual down/up stages instead of the Wan 2.1 ones."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per stage (Wan: 1, 2, 4, 4)."""
    num_res_blocks: int = 2
    """Residual blocks per encoder stage (decoder stages have one more)."""
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    """Which down stages also halve time (mirrored for the decoder)."""
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    """Per-channel latent mean for normalisation; ``z_dim`` entries."""
    latent_std: tuple[float, ...] = WAN21_LATENT_STD
    """Per-channel latent std for normalisation; ``z_dim`` entries."""
    state_dict_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    """Key remap applied before loading (e.g. ``wan21_diffusers_vae_state_dict_transform``)."""


def _check_fields(config: _WanVAEFields) -> None:
    if config.is_residual or config.patch_size != 1:
        raise NotImplementedError(
            "the Wan 2.2 TI2V 5B VAE (is_residual=True, patch_size=2) is not implemented yet; "
            "only the Wan 2.1 VAE layout is available"
        )
    if len(config.latent_mean) != config.z_dim or len(config.latent_std) != config.z_dim:
        raise ValueError(
            f"latent_mean / latent_std need z_dim={config.z_dim} entries, got "
            f"{len(config.latent_mean)} / {len(config.latent_std)}"
        )
    if len(config.temporal_downsample) != len(config.dim_mult) - 1:
        raise ValueError(
            f"temporal_downsample needs {len(config.dim_mult) - 1} entries (one per down stage), "
            f"got {len(config.temporal_downsample)}"
        )


def _load_half(module: torch.nn.Module, config: _WanVAEFields, prefixes: tuple[str, ...]) -> None:
    """Load the keys of one half of the VAE (the checkpoint holds both halves)."""
    state_dict = load_checkpoint(config.checkpoint_path)
    if config.state_dict_transform is not None:
        state_dict = config.state_dict_transform(state_dict)
    own = {key: value for key, value in state_dict.items() if key.startswith(prefixes)}
    load_state_dict_into_module(
        module, own, source=f"Wan VAE checkpoint '{config.checkpoint_path}'"
    )


def _maybe_accelerate(
    codec: torch.nn.Module, config: _WanVAEFields, stack: torch.nn.Module
) -> None:
    device_is_cuda = next(codec.parameters()).is_cuda
    if not device_is_cuda:
        if config.use_compile or config.use_cuda_graph:
            logger.info(
                f"{type(codec).__name__}: use_compile / use_cuda_graph are CUDA-only; running eagerly on CPU"
            )
        return
    if config.use_compile:
        stack.forward = torch.compile(stack.forward, mode="max-autotune-no-cudagraphs")  # type: ignore[method-assign]
    if config.use_cuda_graph:
        logger.info(
            f"{type(codec).__name__}: CUDA-graph capture of the VAE is not implemented; running eagerly"
        )


class _WanVAECodec:
    """Shared helpers of the encoder and the decoder."""

    config: _WanVAEFields
    vae: WanVAE

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.config.dim_mult) - 1) * self.config.patch_size

    @property
    def temporal_compression_ratio(self) -> int:
        return 2 ** sum(self.config.temporal_downsample)

    def initialize_autoregressive_cache(self, **_context: Any) -> WanVAECache:
        return WanVAECache()

    def _normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)  # broadcast over [B, C, T, H, W]
        mean = torch.tensor(self.config.latent_mean, device=like.device, dtype=torch.float32).view(
            shape
        )
        std = torch.tensor(self.config.latent_std, device=like.device, dtype=torch.float32).view(
            shape
        )
        return mean, std

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


class WanVAEEncoder(_WanVAECodec, StreamingVideoEncoder[WanVAECache]):
    """Wan VAE encoder: video ``[..., T, 3, H, W]`` in [-1, 1] -> normalised latent ``[..., Tl, z, h, w]``.

    Returns the posterior mean, ``(mu - latent_mean) / latent_std``. The cache
    advances in place; ``cache=None`` encodes one self-contained clip.
    """

    def __init__(self, config: WanVAEEncoderConfig) -> None:
        super().__init__(config)
        _check_fields(config)
        self.vae = WanVAE(
            dim=config.base_dim,
            z_dim=config.z_dim,
            dim_mult=tuple(config.dim_mult),
            num_res_blocks=config.num_res_blocks,
            temporal_downsample=tuple(config.temporal_downsample),
            with_decoder=False,
        )
        if config.checkpoint_path is not None:
            _load_half(self.vae, config, ("encoder.", "conv1."))
        self.vae.to(config.dtype)
        self._accelerated = False

    def get_output_temporal_size(self, autoregressive_index: int, input_temporal_size: int) -> int:
        ratio = self.temporal_compression_ratio
        if autoregressive_index == 0:
            return 1 + (input_temporal_size - 1) // ratio
        return input_temporal_size // ratio

    def get_input_temporal_size(self, autoregressive_index: int, output_temporal_size: int) -> int:
        if output_temporal_size < 1:
            raise ValueError(f"need at least one latent frame, got {output_temporal_size}")
        ratio = self.temporal_compression_ratio
        if autoregressive_index == 0:
            return 1 + (output_temporal_size - 1) * ratio
        return output_temporal_size * ratio

    def forward(
        self, input: torch.Tensor, autoregressive_index: int = 0, cache: WanVAECache | None = None
    ) -> torch.Tensor:
        if not self._accelerated:
            _maybe_accelerate(self, self.config, self.vae.encoder)
            self._accelerated = True
        if cache is None:
            cache = self.initialize_autoregressive_cache()
        if cache.features is None:
            cache.features = self.vae.new_encoder_cache()
        batch_shape = input.shape[:-4]
        # [..., T, 3, H, W] -> [B, 3, T, H, W]
        video = input.reshape(-1, *input.shape[-4:]).transpose(1, 2).to(self._dtype)
        mean = self.vae.encode_mean(video, cache.features, first_call=cache.num_calls == 0)
        cache.num_calls += 1
        latent_mean, latent_std = self._normalisation(mean)
        latent = ((mean.float() - latent_mean) / latent_std).to(input.dtype)
        # [B, z, Tl, h, w] -> [..., Tl, z, h, w]
        return latent.transpose(1, 2).reshape(*batch_shape, *latent.transpose(1, 2).shape[1:])


class WanVAEDecoder(_WanVAECodec, StreamingVideoDecoder[WanVAECache]):
    """Wan VAE decoder: normalised latent ``[..., Tl, z, h, w]`` -> video ``[..., T, 3, H, W]`` in [-1, 1].

    The cache advances in place; ``cache=None`` decodes one self-contained clip.
    """

    def __init__(self, config: WanVAEDecoderConfig) -> None:
        super().__init__(config)
        _check_fields(config)
        self.vae = WanVAE(
            dim=config.base_dim,
            z_dim=config.z_dim,
            dim_mult=tuple(config.dim_mult),
            num_res_blocks=config.num_res_blocks,
            temporal_downsample=tuple(config.temporal_downsample),
            with_encoder=False,
            decoder_dim=config.decoder_base_dim,
        )
        if config.checkpoint_path is not None:
            _load_half(self.vae, config, ("decoder.", "conv2."))
        self.vae.to(config.dtype)
        self._accelerated = False

    def get_output_temporal_size(self, autoregressive_index: int, input_temporal_size: int) -> int:
        ratio = self.temporal_compression_ratio
        if autoregressive_index == 0:
            return 1 + (input_temporal_size - 1) * ratio
        return input_temporal_size * ratio

    def get_input_temporal_size(self, autoregressive_index: int, output_temporal_size: int) -> int:
        ratio = self.temporal_compression_ratio
        extra = 1 if autoregressive_index == 0 else 0
        if output_temporal_size < 1 or (output_temporal_size - extra) % ratio:
            raise ValueError(
                f"{output_temporal_size} pixel frames cannot be decoded at AR step "
                f"{autoregressive_index}: it needs {'1 + ' if extra else ''}{ratio}k frames"
            )
        return (output_temporal_size - extra) // ratio + extra

    def forward(
        self, input: torch.Tensor, autoregressive_index: int = 0, cache: WanVAECache | None = None
    ) -> torch.Tensor:
        if not self._accelerated:
            _maybe_accelerate(self, self.config, self.vae.decoder)
            self._accelerated = True
        if cache is None:
            cache = self.initialize_autoregressive_cache()
        if cache.features is None:
            cache.features = self.vae.new_decoder_cache()
        batch_shape = input.shape[:-4]
        # [..., Tl, z, h, w] -> [B, z, Tl, h, w]
        latent = input.reshape(-1, *input.shape[-4:]).transpose(1, 2).float()
        latent_mean, latent_std = self._normalisation(latent)
        latent = (latent * latent_std + latent_mean).to(self._dtype)
        video = self.vae.decode(latent, cache.features)
        cache.num_calls += 1
        # [B, 3, T, H, W] -> [..., T, 3, H, W]
        video = video.transpose(1, 2)
        return video.reshape(*batch_shape, *video.shape[1:])


@dataclass(kw_only=True)
class WanVAEEncoderConfig(_WanVAEFields, EncoderConfig):
    """Config of the Wan VAE encoder (defaults: Wan 2.1, 8x spatial, 4x temporal, 16 channels)."""

    _target: type[WanVAEEncoder] = field(default_factory=lambda: WanVAEEncoder)
    """Always :class:`WanVAEEncoder`."""


@dataclass(kw_only=True)
class WanVAEDecoderConfig(_WanVAEFields, DecoderConfig):
    """Config of the Wan VAE decoder (defaults: Wan 2.1, 8x spatial, 4x temporal, 16 channels)."""

    _target: type[WanVAEDecoder] = field(default_factory=lambda: WanVAEDecoder)
    """Always :class:`WanVAEDecoder`."""
    decoder_base_dim: int | None = None
    """Decoder base channels; ``None`` = ``base_dim`` (Wan 2.1). Wan 2.2 TI2V 5B uses 256."""


def wan22_ti2v_5b_vae_state_dict_transform(
    state_dict: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKLWan`` (Wan 2.2 TI2V 5B) keys -> this VAE's keys (not implemented yet)."""
    raise NotImplementedError("the Wan 2.2 TI2V 5B VAE is not implemented yet")


@dataclass(kw_only=True)
class Wan22TI2V5BVAEEncoderConfig(WanVAEEncoderConfig):
    """Wan 2.2 TI2V 5B encoder preset: 16x spatial, 48 channels, residual stages, 2x2 pixel packing."""

    checkpoint_path: str | None = WAN22_VAE_URL
    """Upstream diffusers checkpoint address (download it and pass the local path)."""
    base_dim: int = 160
    """Encoder base channels."""
    z_dim: int = 48
    """Latent channels."""
    patch_size: int = 2
    """2x2 pixel packing."""
    is_residual: bool = True
    """Residual down stages."""
    latent_mean: tuple[float, ...] = WAN22_LATENT_MEAN
    """Per-channel latent mean (48 entries)."""
    latent_std: tuple[float, ...] = WAN22_LATENT_STD
    """Per-channel latent std (48 entries)."""
    state_dict_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = (
        wan22_ti2v_5b_vae_state_dict_transform
    )
    """Diffusers -> flashdreams key remap."""


@dataclass(kw_only=True)
class Wan22TI2V5BVAEDecoderConfig(WanVAEDecoderConfig):
    """Wan 2.2 TI2V 5B decoder preset: as the encoder preset with the asymmetric 256-channel decoder."""

    checkpoint_path: str | None = WAN22_VAE_URL
    """Upstream diffusers checkpoint address (download it and pass the local path)."""
    base_dim: int = 160
    """Base channels."""
    decoder_base_dim: int | None = 256
    """Decoder base channels."""
    z_dim: int = 48
    """Latent channels."""
    patch_size: int = 2
    """2x2 pixel packing."""
    is_residual: bool = True
    """Residual up stages."""
    latent_mean: tuple[float, ...] = WAN22_LATENT_MEAN
    """Per-channel latent mean (48 entries)."""
    latent_std: tuple[float, ...] = WAN22_LATENT_STD
    """Per-channel latent std (48 entries)."""
    state_dict_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = (
        wan22_ti2v_5b_vae_state_dict_transform
    )
    """Diffusers -> flashdreams key remap."""
