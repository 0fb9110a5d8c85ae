"""Streaming Wan VAE encoder and decoder (Wan 2.1, and the Wan 2.2 TI2V 5B residual VAE).

Both run one AR step at a time: the trailing frames every causal conv needs
are kept in a :class:`WanVAECache`, so encoding or decoding a video chunk by
chunk gives the same result as one call over the whole video.

Chunking follows upstream Wan: the encoder sees the first pixel frame alone,
then groups of 4 frames (one latent frame each); the decoder sees one latent
frame at a time, and the very first one decodes to a single pixel frame.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from loguru import logger

from flashdreams.core.checkpoint import (
    empty_init,
    load_checkpoint,
    load_state_dict_into_module,
    remap_checkpoint_keys,
    resolve_local_checkpoint,
)
from flashdreams.core.checkpoint.layout import find_layout, strip_prefix
from flashdreams.infra.decoder.base import (
    DecoderConfig,
    StreamingDecoderCache,
    StreamingVideoDecoder,
)
from flashdreams.infra.encoder.base import (
    EncoderConfig,
    StreamingEncoderCache,
    StreamingVideoEncoder,
)
from flashdreams.recipes.wan.autoencoder.layers import (
    CausalConv3d,
    Decoder3d,
    Encoder3d,
    FeatureCache,
    RowSlabs,
    count_causal_convs,
)

WAN21_VAE_CHECKPOINT = "https://huggingface.co/lightx2v/Autoencoders/resolve/main/Wan2.1_VAE.pth"
WAN22_TI2V_5B_VAE_CHECKPOINT = (
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
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.157, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

NUM_FRAMES_PER_LATENT = 4
"""Pixel frames per latent frame after the first one (Wan's 4x temporal compression)."""


# --------------------------------------------------------------------------- pixel packing


def patchify_video(video: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pack ``p x p`` pixel blocks into channels, width offset before height offset.

    ``[b, c, t, (h q), (w r)] -> [b, (c r q), t, h, w]``, the Wan 2.2 order.
    """
    if patch_size == 1:
        return video
    p = patch_size
    b, c, t, height, width = video.shape
    x = video.reshape(b, c, t, height // p, p, width // p, p)  # b c t h q w r
    x = x.permute(0, 1, 6, 4, 2, 3, 5)  # b c r q t h w
    return x.reshape(b, c * p * p, t, height // p, width // p)


def unpatchify_video(packed: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify_video`: ``[b, (c r q), t, h, w] -> [b, c, t, (h q), (w r)]``."""
    if patch_size == 1:
        return packed
    p = patch_size
    b, packed_channels, t, h, w = packed.shape
    x = packed.reshape(b, packed_channels // (p * p), p, p, t, h, w)  # b c r q t h w
    x = x.permute(0, 1, 4, 5, 3, 6, 2)  # b c t h q w r
    return x.reshape(b, packed_channels // (p * p), t, h * p, w * p)


# --------------------------------------------------------------------------- diffusers key remap


def _num_resnets(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}
    if not indices:
        raise KeyError(f"diffusers Wan VAE state dict has no key matching '{pattern}'")
    return max(indices) + 1


def _shared_diffusers_vae_patterns(resnet_prefix: str = r"resnets\.\d+\.") -> list[tuple[str, str]]:
    """Renames common to the 2.1 and 2.2 diffusers layouts (resnet internals, mid block, ends).

    ``resnet_prefix`` matches the part of a key naming one residual block.
    """
    return [
        # Inside residual blocks, while the key still has its diffusers block name.
        (rf"({resnet_prefix})norm1\.", r"\1residual.0."),
        (rf"({resnet_prefix})conv1\.", r"\1residual.2."),
        (rf"({resnet_prefix})norm2\.", r"\1residual.3."),
        (rf"({resnet_prefix})conv2\.", r"\1residual.6."),
        (rf"({resnet_prefix})conv_shortcut\.", r"\1shortcut."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
    ]


def wan21_diffusers_vae_state_dict_transform(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Remap a diffusers ``AutoencoderKLWan`` state dict (Wan 2.1 layout) to the original Wan keys.

    Purely structural (no tensor is copied). The decoder's flat ``upsamples``
    index is ``stage * (num_resnets + 1) + block``, with ``num_resnets`` read off the keys.
    """
    has_decoder = any(key.startswith("decoder.up_blocks.") for key in state_dict)
    # 2.1 encoder resnets sit directly in ``down_blocks`` (``encoder.down_blocks.N.norm1``).
    patterns = _shared_diffusers_vae_patterns(r"resnets\.\d+\.|^encoder\.down_blocks\.\d+\.")
    patterns.append((r"^encoder\.down_blocks\.", "encoder.downsamples."))
    if has_decoder:
        per_stage = _num_resnets(state_dict, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.") + 1

        def flat_resnet(match: re.Match[str]) -> str:
            return f"decoder.upsamples.{int(match.group(1)) * per_stage + int(match.group(2))}."

        def flat_upsampler(match: re.Match[str]) -> str:
            return f"decoder.upsamples.{int(match.group(1)) * per_stage + per_stage - 1}."

        renamed = remap_checkpoint_keys(state_dict, patterns)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in renamed.items():
            key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", flat_resnet, key)
            key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", flat_upsampler, key)
            out[key] = tensor
        return out
    return remap_checkpoint_keys(state_dict, patterns)


def wan22_ti2v_5b_vae_state_dict_transform(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Remap a diffusers ``AutoencoderKLWan`` state dict (Wan 2.2 TI2V 5B layout) to the original keys.

    Purely structural (no tensor is copied): ``down_blocks.i.resnets.j`` ->
    ``downsamples.i.downsamples.j``, ``down_blocks.i.downsampler`` -> the entry
    after the resnets, and the same for the decoder's ``up_blocks`` / ``upsampler``.
    Keys no pattern matches pass through and then show up as unexpected keys.
    """
    patterns = _shared_diffusers_vae_patterns()
    patterns += [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.downsamples.\1.downsamples."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.upsamples.\1.upsamples."),
    ]
    if any(key.startswith("encoder.down_blocks.") for key in state_dict):
        num_down = _num_resnets(state_dict, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        patterns.append(
            (
                r"^encoder\.down_blocks\.(\d+)\.downsampler\.",
                rf"encoder.downsamples.\1.downsamples.{num_down}.",
            )
        )
    if any(key.startswith("decoder.up_blocks.") for key in state_dict):
        num_up = _num_resnets(state_dict, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")
        patterns.append(
            (
                r"^decoder\.up_blocks\.(\d+)\.upsampler\.",
                rf"decoder.upsamples.\1.upsamples.{num_up}.",
            )
        )
    return remap_checkpoint_keys(state_dict, patterns)


def to_original_wan_vae_keys(
    state_dict: Mapping[str, torch.Tensor],
    *,
    part: str,
    is_residual: bool,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Bring a Wan VAE state dict in the original or the diffusers layout to the original keys.

    ``part`` (``"encoder"`` or ``"decoder"``) names the half whose marker key is
    looked for. Diffusers keys are renamed with the Wan 2.2 remap for a residual
    VAE (``is_residual``) and the Wan 2.1 remap otherwise; anything else raises a
    one-line ``ValueError`` naming the layouts looked for.
    """
    markers = {
        "original Wan keys": f"{part}.conv1.weight",
        "diffusers keys": f"{part}.conv_in.weight",
    }
    found = find_layout(state_dict, markers, what="Wan VAE", source=source)
    weights = state_dict if not found.is_nested else strip_prefix(state_dict, found.prefix)
    if found.is_nested:
        logger.info(f"{source}: loading its '{found.prefix}' weights")
    if found.layout == "diffusers keys":
        transform = (
            wan22_ti2v_5b_vae_state_dict_transform
            if is_residual
            else wan21_diffusers_vae_state_dict_transform
        )
        logger.info(f"{source}: diffusers layout, renamed with {transform.__name__}")
        return transform(weights)
    return dict(weights)


# --------------------------------------------------------------------------- cache


@dataclass(kw_only=True)
class WanVAECache(StreamingEncoderCache, StreamingDecoderCache):
    """Per-rollout state of a streaming Wan VAE encoder or decoder."""

    feature_cache: FeatureCache
    """Trailing frames of every causal conv, carried from one chunk to the next."""

    num_processed_frames: int = 0
    """Input frames consumed so far (pixel frames for the encoder, latent frames for the decoder)."""


# --------------------------------------------------------------------------- shared base


def _validate_architecture(config: WanVAEEncoderConfig | WanVAEDecoderConfig) -> None:
    if len(config.latent_mean) != config.z_dim or len(config.latent_std) != config.z_dim:
        raise ValueError(
            f"latent_mean and latent_std need z_dim={config.z_dim} entries; got "
            f"{len(config.latent_mean)} and {len(config.latent_std)}"
        )
    if config.patch_size < 1:
        raise ValueError(f"patch_size must be >= 1; got {config.patch_size}")
    if len(config.temporal_downsample) != len(config.dim_mult) - 1:
        raise ValueError(
            f"temporal_downsample needs len(dim_mult) - 1 = {len(config.dim_mult) - 1} entries; "
            f"got {len(config.temporal_downsample)}"
        )


class _WanVAEMixin:
    """Compression ratios, checkpoint loading and CUDA compilation shared by encoder and decoder."""

    config: WanVAEEncoderConfig | WanVAEDecoderConfig
    _owned_prefixes: tuple[str, ...]
    _kind: str

    def _init_common(self) -> None:
        config = self.config
        mean = torch.tensor(config.latent_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latent_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.register_buffer("latent_mean", mean, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("latent_std", std, persistent=False)  # type: ignore[attr-defined]
        if self._checkpoint is not None:
            self.load_from_checkpoint(str(self._checkpoint))
        self.to(config.dtype)  # type: ignore[attr-defined]
        self.latent_mean = self.latent_mean.float()
        self.latent_std = self.latent_std.float()
        self._compiled: Callable[..., Any] | None = None
        self._compile_checked = False

    def load_from_checkpoint(self, checkpoint_path: str) -> None:
        """Load a local ``.pth`` / ``.safetensors`` file or diffusers folder (keys of the other half are dropped)."""
        local = resolve_local_checkpoint(checkpoint_path, what=f"Wan VAE {self._kind} checkpoint")
        state_dict = load_checkpoint(local)
        if self.config.state_dict_transform is not None:
            state_dict = self.config.state_dict_transform(state_dict)
        state_dict = to_original_wan_vae_keys(
            state_dict,
            part=self._kind,
            is_residual=self.config.is_residual,
            source=f"Wan VAE checkpoint '{local}'",
        )
        own = {k: v for k, v in state_dict.items() if k.startswith(self._owned_prefixes)}
        load_state_dict_into_module(self, own, source=f"Wan VAE checkpoint '{local}'")  # type: ignore[arg-type]

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.config.dim_mult) - 1) * self.config.patch_size

    @property
    def temporal_compression_ratio(self) -> int:
        return 2 ** sum(bool(flag) for flag in self.config.temporal_downsample)

    def _network(self, module: nn.Module, device: torch.device) -> Callable[..., Any]:
        """``module`` itself, or on CUDA its compiled form when asked for (logged once on CPU)."""
        if not self._compile_checked:
            self._compile_checked = True
            wants_compile = self.config.use_compile or self.config.use_cuda_graph
            if wants_compile and device.type != "cuda":
                logger.info(
                    f"Wan VAE {self._kind}: use_compile/use_cuda_graph need CUDA; running eagerly"
                )
            elif wants_compile:
                mode = (
                    "reduce-overhead"
                    if self.config.use_cuda_graph
                    else "max-autotune-no-cudagraphs"
                )
                self._compiled = torch.compile(module, mode=mode, dynamic=False)
        return module if self._compiled is None else self._compiled

    def _run_chunk(
        self, module: nn.Module, x: torch.Tensor, cache: FeatureCache, **kwargs: Any
    ) -> torch.Tensor:
        cache.cursor = 0
        # A row slab talks to its neighbours inside the network: run it eagerly.
        network = module if cache.rows is not None else self._network(module, x.device)
        if x.device.type == "cpu":
            # oneDNN's convolutions are fastest on channels-last activations, and the
            # channel RMSNorm then reduces over the innermost dim (bench/RESULTS.md).
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with _cudnn_benchmark(x.device):
            out = network(x, cache, **kwargs).contiguous()
        if network is not module:
            # CUDA-graph outputs live in pooled buffers that the next replay overwrites.
            out = out.clone()
            cache.slots = [s.clone() if isinstance(s, torch.Tensor) else s for s in cache.slots]
        return out


def _cudnn_benchmark(device: torch.device) -> contextlib.AbstractContextManager:
    """cuDNN autotuning for the VAE's calls only (it runs the same conv shapes on every
    chunk, so cuDNN picks the fastest algorithm once per shape); the process-wide
    setting is restored afterwards."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled,
        benchmark=True,
        deterministic=cudnn.deterministic,
        allow_tf32=cudnn.allow_tf32,
    )


# --------------------------------------------------------------------------- encoder


@dataclass(kw_only=True)
class _WanVAEFields:
    """Fields shared by the Wan VAE encoder and decoder configs."""

    checkpoint_path: str | None = WAN21_VAE_CHECKPOINT
    """Local ``.pth`` / ``.safetensors`` file or diffusers folder. The default names the upstream
    file, which is never downloaded (fetch it and point here). ``None`` or ``""``: random init."""

    dtype: torch.dtype = torch.bfloat16
    """Parameter and compute dtype."""

    use_cuda_graph: bool = True
    """On CUDA, compile with CUDA-graph replay (``mode="reduce-overhead"``). Ignored on CPU."""

    use_compile: bool = False
    """On CUDA, ``torch.compile(mode="max-autotune-no-cudagraphs")``. Off by default: autotuning
    can take several GiB of transient memory per input shape. Ignored on CPU."""

    base_dim: int = 96
    """Base channel count: 96 for Wan 2.1, 160 for Wan 2.2 TI2V 5B (the decoder uses it unless
    ``decoder_base_dim`` is set)."""

    z_dim: int = 16
    """Latent channels: 16 for Wan 2.1, 48 for Wan 2.2 TI2V 5B."""

    patch_size: int = 1
    """Pixel (un)packing around the network (2 for Wan 2.2 TI2V 5B, giving 16x spatial compression)."""

    is_residual: bool = False
    """Wan 2.2 residual stages (``AvgDown3D`` / ``DupUp3D`` shortcuts) instead of the plain Wan 2.1 ones."""

    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    """Per-channel latent mean of the normalisation; ``z_dim`` entries."""

    latent_std: tuple[float, ...] = WAN21_LATENT_STD
    """Per-channel latent std of the normalisation; ``z_dim`` entries."""

    state_dict_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    """Key remap applied to the loaded state dict. Not needed for the original Wan keys
    (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``) nor for a diffusers ``vae`` folder: the
    layout is detected after this runs and diffusers keys are renamed."""

    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier of each stage (the real Wan value; smaller in tiny test models)."""

    num_res_blocks: int = 2
    """Residual blocks per encoder stage; decoder stages have ``num_res_blocks + 1``."""

    temporal_downsample: tuple[bool, ...] = (False, True, True)
    """Per down stage but the last: whether it halves time (diffusers' ``temperal_downsample``);
    the decoder upsamples time in reverse order."""


@dataclass(kw_only=True)
class WanVAEEncoderConfig(_WanVAEFields, EncoderConfig):
    """Config of :class:`WanVAEEncoder`; the defaults are the Wan 2.1 VAE (8x space, 4x time, 16 ch)."""

    _target: type[WanVAEEncoder] = field(default_factory=lambda: WanVAEEncoder)
    """Always :class:`WanVAEEncoder`."""


class WanVAEEncoder(_WanVAEMixin, StreamingVideoEncoder[WanVAECache]):
    """Wan VAE encoder: video ``[..., T, 3, H, W]`` in [-1, 1] -> normalised latent ``[..., Tl, Cl, Hl, Wl]``.

    The latent is the posterior mean, normalised as ``(mu - latent_mean) / latent_std``.
    A rollout's first call takes ``1 + 4 k`` frames, later calls ``4 k``; the
    cache (fresh when ``None``) is advanced in place.
    """

    _owned_prefixes = ("encoder.", "conv1.")
    _kind = "encoder"

    def __init__(self, config: WanVAEEncoderConfig) -> None:
        super().__init__(config)
        self.config: WanVAEEncoderConfig = config
        _validate_architecture(config)
        # Fail on a missing / remote checkpoint before building a large model.
        self._checkpoint = (
            resolve_local_checkpoint(
                config.checkpoint_path, what=f"Wan VAE {self._kind} checkpoint"
            )
            if config.checkpoint_path
            else None
        )
        # With a checkpoint every weight comes from the file: no random initialisation.
        with empty_init(self._checkpoint is not None):
            self.encoder = Encoder3d(
                dim=config.base_dim,
                z_dim=config.z_dim * 2,
                dim_mult=tuple(config.dim_mult),
                num_res_blocks=config.num_res_blocks,
                temporal_downsample=tuple(config.temporal_downsample),
                is_residual=config.is_residual,
                in_channels=3 * config.patch_size**2,
            )
            self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self._init_common()

    def initialize_autoregressive_cache(self, **context: Any) -> WanVAECache:
        return WanVAECache(feature_cache=FeatureCache(count_causal_convs(self.encoder)))

    def get_output_temporal_size(self, autoregressive_index: int, input_temporal_size: int) -> int:
        """AR 0: ``1 + 4 k`` frames -> ``1 + k`` latents; AR >= 1: ``4 k`` frames -> ``k`` latents."""
        ratio = self.temporal_compression_ratio
        extra = 1 if autoregressive_index == 0 else 0
        if input_temporal_size < extra or (input_temporal_size - extra) % ratio != 0:
            raise ValueError(
                f"the Wan VAE encoder cannot take {input_temporal_size} frames at AR step "
                f"{autoregressive_index}: it needs {'1 + ' if extra else ''}{ratio} * k frames"
            )
        return (input_temporal_size - extra) // ratio + extra

    def get_input_temporal_size(self, autoregressive_index: int, output_temporal_size: int) -> int:
        """Pixel frames for ``output_temporal_size`` latents: ``1 + 4 (Tl - 1)`` at AR 0, else ``4 Tl``."""
        if output_temporal_size < 1:
            raise ValueError(f"output_temporal_size must be >= 1; got {output_temporal_size}")
        ratio = self.temporal_compression_ratio
        if autoregressive_index == 0:
            return 1 + ratio * (output_temporal_size - 1)
        return ratio * output_temporal_size

    @torch.no_grad()
    def forward(
        self,
        input: torch.Tensor,
        autoregressive_index: int = 0,
        cache: WanVAECache | None = None,
    ) -> torch.Tensor:
        """Encode one chunk. Whether it starts the video follows from the cache (nothing seen yet)."""
        if input.ndim < 4 or input.shape[-3] != 3:
            raise ValueError(
                f"the Wan VAE encoder expects a video [..., T, 3, H, W]; got shape {tuple(input.shape)}"
            )
        side = self.spatial_compression_ratio
        if input.shape[-2] % side or input.shape[-1] % side:
            raise ValueError(
                f"frame size {tuple(input.shape[-2:])} must be divisible by the spatial "
                f"compression ratio {side}"
            )
        if cache is None:
            cache = self.initialize_autoregressive_cache()
        is_first_chunk = cache.num_processed_frames == 0
        num_frames = input.shape[-4]
        ratio = self.temporal_compression_ratio
        start = 1 if is_first_chunk else 0
        if num_frames < 1 or (num_frames - start) % ratio != 0:
            raise ValueError(
                f"the Wan VAE encoder got {num_frames} frames; "
                f"{'the first chunk of a video needs 1 + ' if is_first_chunk else 'later chunks need '}"
                f"{ratio} * k frames"
            )
        leading_shape = input.shape[:-4]
        # [..., T, C, H, W] -> [b, C, T, H, W]
        video = input.reshape(-1, *input.shape[-4:]).transpose(1, 2).to(self.config.dtype)
        video = patchify_video(video, self.config.patch_size)
        groups = ([(0, 1)] if is_first_chunk else []) + [
            (begin, begin + ratio) for begin in range(start, num_frames, ratio)
        ]
        features = [
            self._run_chunk(self.encoder, video[:, :, begin:end], cache.feature_cache)
            for begin, end in groups
        ]
        cache.num_processed_frames += num_frames
        mu, _log_var = self.conv1(torch.cat(features, dim=2)).chunk(2, dim=1)
        latent = (mu.float() - self.latent_mean) / self.latent_std
        latent = latent.transpose(1, 2)  # [b, Tl, Cl, Hl, Wl]
        return latent.reshape(*leading_shape, *latent.shape[1:]).to(input.dtype)


# --------------------------------------------------------------------------- decoder


@dataclass(kw_only=True)
class WanVAEDecoderConfig(_WanVAEFields, DecoderConfig):
    """Config of :class:`WanVAEDecoder`; the defaults are the Wan 2.1 VAE (8x space, 4x time, 16 ch)."""

    _target: type[WanVAEDecoder] = field(default_factory=lambda: WanVAEDecoder)
    """Always :class:`WanVAEDecoder`."""

    decoder_base_dim: int | None = None
    """Decoder base channel count. ``None`` mirrors ``base_dim`` (Wan 2.1); Wan 2.2 TI2V 5B uses 256."""


class WanVAEDecoder(_WanVAEMixin, StreamingVideoDecoder[WanVAECache]):
    """Wan VAE decoder: normalised latent ``[..., Tl, Cl, Hl, Wl]`` -> video ``[..., T, 3, H, W]`` in [-1, 1].

    Latent frames are decoded one at a time; the first latent frame of a
    rollout gives one pixel frame, every other gives 4. The cache (fresh when
    ``None``) is advanced in place.
    """

    _owned_prefixes = ("decoder.", "conv2.")
    _kind = "decoder"
    supports_row_slabs = True

    def __init__(self, config: WanVAEDecoderConfig) -> None:
        super().__init__(config)
        self.config: WanVAEDecoderConfig = config
        _validate_architecture(config)
        # Fail on a missing / remote checkpoint before building a large model.
        self._checkpoint = (
            resolve_local_checkpoint(
                config.checkpoint_path, what=f"Wan VAE {self._kind} checkpoint"
            )
            if config.checkpoint_path
            else None
        )
        # With a checkpoint every weight comes from the file: no random initialisation.
        with empty_init(self._checkpoint is not None):
            self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
            self.decoder = Decoder3d(
                dim=config.decoder_base_dim or config.base_dim,
                z_dim=config.z_dim,
                dim_mult=tuple(config.dim_mult),
                num_res_blocks=config.num_res_blocks,
                temporal_upsample=tuple(config.temporal_downsample)[::-1],
                is_residual=config.is_residual,
                out_channels=3 * config.patch_size**2,
            )
        self._init_common()

    def initialize_autoregressive_cache(
        self, rows: RowSlabs | None = None, **context: Any
    ) -> WanVAECache:
        """A fresh cache; with ``rows`` it decodes that row slab of each frame (parallel decode)."""
        return WanVAECache(feature_cache=FeatureCache(count_causal_convs(self.decoder), rows))

    def get_output_temporal_size(self, autoregressive_index: int, input_temporal_size: int) -> int:
        """AR 0: ``1 + 4 (Tl - 1)`` pixel frames (the first latent gives one); AR >= 1: ``4 Tl``."""
        ratio = self.temporal_compression_ratio
        if autoregressive_index == 0:
            return 1 + ratio * (input_temporal_size - 1)
        return ratio * input_temporal_size

    def get_input_temporal_size(self, autoregressive_index: int, output_temporal_size: int) -> int:
        """Inverse of :meth:`get_output_temporal_size`; raises if the count is not reachable."""
        ratio = self.temporal_compression_ratio
        extra = ratio - 1 if autoregressive_index == 0 else 0
        if output_temporal_size < 1 or (output_temporal_size + extra) % ratio != 0:
            rule = f"1 + {ratio} * k" if autoregressive_index == 0 else f"{ratio} * k"
            raise ValueError(
                f"the Wan VAE decoder cannot produce {output_temporal_size} frames at AR step "
                f"{autoregressive_index}: the count must be {rule}"
            )
        return (output_temporal_size + extra) // ratio

    @torch.no_grad()
    def forward(
        self,
        input: torch.Tensor,
        autoregressive_index: int = 0,
        cache: WanVAECache | None = None,
    ) -> torch.Tensor:
        """Decode one latent chunk. Whether it starts the video follows from the cache."""
        if input.ndim < 4 or input.shape[-3] != self.config.z_dim:
            raise ValueError(
                f"the Wan VAE decoder expects a latent [..., Tl, {self.config.z_dim}, Hl, Wl]; "
                f"got shape {tuple(input.shape)}"
            )
        if cache is None:
            cache = self.initialize_autoregressive_cache()
        leading_shape = input.shape[:-4]
        # [..., Tl, Cl, Hl, Wl] -> [b, Cl, Tl, Hl, Wl], un-normalised
        latent = input.reshape(-1, *input.shape[-4:]).transpose(1, 2).float()
        latent = (latent * self.latent_std + self.latent_mean).to(self.config.dtype)
        x = self.conv2(latent)
        frames = []
        for index in range(x.shape[2]):
            first_chunk = cache.num_processed_frames == 0
            frames.append(
                self._run_chunk(
                    self.decoder,
                    x[:, :, index : index + 1],
                    cache.feature_cache,
                    first_chunk=first_chunk,
                )
            )
            cache.num_processed_frames += 1
        video = unpatchify_video(torch.cat(frames, dim=2), self.config.patch_size)
        video = video.clamp(-1.0, 1.0).transpose(1, 2)  # [b, T, 3, H, W]
        return video.reshape(*leading_shape, *video.shape[1:]).to(input.dtype)


# --------------------------------------------------------------------------- Wan 2.2 TI2V 5B presets


@dataclass(kw_only=True)
class _Wan22TI2V5BFields(_WanVAEFields):
    """Field overrides shared by the Wan 2.2 TI2V 5B encoder and decoder presets."""

    checkpoint_path: str | None = WAN22_TI2V_5B_VAE_CHECKPOINT
    """Local copy of the diffusers ``vae/diffusion_pytorch_model.safetensors`` (never downloaded)."""

    base_dim: int = 160
    """Encoder base channel count."""

    z_dim: int = 48
    """Latent channels."""

    patch_size: int = 2
    """2x2 pixel (un)packing (16x spatial compression in total)."""

    is_residual: bool = True
    """Residual down / up stages."""

    latent_mean: tuple[float, ...] = WAN22_LATENT_MEAN
    """Per-channel latent mean of the 5B VAE."""

    latent_std: tuple[float, ...] = WAN22_LATENT_STD
    """Per-channel latent std of the 5B VAE."""

    state_dict_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = (
        wan22_ti2v_5b_vae_state_dict_transform
    )
    """diffusers -> original Wan 2.2 key remap."""


@dataclass(kw_only=True)
class Wan22TI2V5BVAEEncoderConfig(_Wan22TI2V5BFields, WanVAEEncoderConfig):
    """Wan 2.2 TI2V 5B encoder: 160 base channels, 48-ch latent, 2x2 pixel packing, residual stages,
    loaded from the diffusers checkpoint through :func:`wan22_ti2v_5b_vae_state_dict_transform`."""


@dataclass(kw_only=True)
class Wan22TI2V5BVAEDecoderConfig(_Wan22TI2V5BFields, WanVAEDecoderConfig):
    """Wan 2.2 TI2V 5B decoder: like the encoder preset, with the asymmetric ``decoder_base_dim=256``."""

    decoder_base_dim: int | None = 256
    """Decoder base channel count."""
