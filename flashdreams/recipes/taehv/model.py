"""TAEHV (Tiny AutoEncoder for Hunyuan Video) decoder: network, streaming cache, pipeline decoder.

The decoder network is a stack of per-frame 2D layers. Temporal context
enters only through ``MemBlock`` layers, each of which sees its own input
at the previous frame (zeros before the first frame). That makes streaming
exact: a cache holding every ``MemBlock``'s last input frame lets a video
be decoded chunk by chunk with the same result as decoding it in one call.

Shape legend used below:
    N  batch (all leading dims flattened)
    T  frames at the current resolution in time
    C  channels, H / W spatial size
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from loguru import logger

from flashdreams.core.checkpoint import (
    load_checkpoint,
    load_state_dict_into_module,
    resolve_local_checkpoint,
)
from flashdreams.core.distributed.row_slabs import RowSlabs
from flashdreams.infra.decoder import DecoderConfig, StreamingDecoderCache, StreamingVideoDecoder

AVAILABLE_TAEHV_CHECKPOINT_PATHS: dict[str, str] = {
    "lighttae": "https://huggingface.co/lightx2v/Autoencoders/resolve/main/lighttaew2_1.pth",
}
"""Known TAEHV decoder checkpoints by name (upstream addresses; download them yourself)."""

RAW_LATENT_CHECKPOINT_PREFIXES = ("lighttae",)
"""File-name prefixes of checkpoints trained on un-normalised Wan latents. LightX2V's
tiny autoencoders (``lighttaew2_1``, ``lighttaew2_2``) decode ``z * std + mean`` (LightX2V
applies it before every lighttae decoder); madebyollin's ``taew2_1`` / ``taew2_2`` decode
the normalised latent the DiT produces."""


def checkpoint_takes_raw_latents(checkpoint_path: str | None) -> bool:
    """Whether the named TAEHV checkpoint decodes un-normalised Wan latents (by file name)."""
    if checkpoint_path is None:
        return False
    name = Path(str(checkpoint_path).rstrip("/")).name.lower()
    return name.startswith(RAW_LATENT_CHECKPOINT_PREFIXES)


def _wan_latent_statistics(num_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Wan 2.1 (16 channels) or Wan 2.2 (48 channels) latent mean and std."""
    from flashdreams.recipes.wan.autoencoder.vae import (
        WAN21_LATENT_MEAN,
        WAN21_LATENT_STD,
        WAN22_LATENT_MEAN,
        WAN22_LATENT_STD,
    )

    known = {
        len(WAN21_LATENT_MEAN): (WAN21_LATENT_MEAN, WAN21_LATENT_STD),
        len(WAN22_LATENT_MEAN): (WAN22_LATENT_MEAN, WAN22_LATENT_STD),
    }
    if num_channels not in known:
        raise ValueError(
            f"TAEHV: unnormalize_latent needs latent_mean and latent_std; only 16-channel "
            f"(Wan 2.1) and 48-channel (Wan 2.2) latents have defaults, got latent_channels="
            f"{num_channels}"
        )
    return known[num_channels]


# Index of the first-stage temporal upsampler inside ``decoder.blocks`` for the
# default layout (Clamp, conv, ReLU, 3 x MemBlock, Upsample, TGrow, ...).
_LIGHTTAE_FIRST_TGROW_INDEX = 7


def lighttae_state_dict_transform(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapt a ``lighttae`` (``lighttaew2_1.pth``) state dict to :class:`TeahvVAEDecoder`.

    The checkpoint stores the decoder as a flat ``nn.Sequential`` (``decoder.<i>.*``)
    next to encoder weights. This keeps only the decoder, moves it under
    ``decoder.blocks.<i>.*`` and, because the checkpoint's first temporal
    upsampler (index 7) was trained with stride 2 while this model runs it with
    stride 1, keeps only the output channels of its last time step.
    """
    remapped: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if not key.startswith("decoder."):
            continue
        rest = key[len("decoder.") :]
        if rest.startswith("blocks."):
            rest = rest[len("blocks.") :]
        remapped[f"decoder.blocks.{rest}"] = tensor
    tgrow_key = f"decoder.blocks.{_LIGHTTAE_FIRST_TGROW_INDEX}.conv.weight"
    if tgrow_key in remapped:
        weight = remapped[tgrow_key]
        num_channels = weight.shape[1]
        if weight.shape[0] > num_channels:
            # [C * stride, C, 1, 1]: output block s holds time step s; keep the last one.
            remapped[tgrow_key] = weight[-num_channels:]
    return remapped


class Clamp(nn.Module):
    """Smooth clamp of the latent to roughly [-3, 3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv3x3(num_in: int, num_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(num_in, num_out, kernel_size=3, padding=1, bias=bias)


def _apply_layer(layer: nn.Module, x: torch.Tensor, rows: RowSlabs | None) -> torch.Tensor:
    """``layer(x)``; with ``rows`` (``x`` is a row slab) a conv takes its height padding from the neighbours."""
    if rows is not None and isinstance(layer, nn.Conv2d) and layer.padding[0]:
        x = rows.pad_rows(x, layer.padding[0])
        return F.conv2d(x, layer.weight, layer.bias, layer.stride, (0, layer.padding[1]))
    return layer(x)


class MemBlock(nn.Module):
    """Residual block that also looks at its own input one frame earlier."""

    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(num_in * 2, num_out),
            nn.ReLU(),
            _conv3x3(num_out, num_out),
            nn.ReLU(),
            _conv3x3(num_out, num_out),
        )
        self.skip = (
            nn.Conv2d(num_in, num_out, kernel_size=1, bias=False)
            if num_in != num_out
            else nn.Identity()
        )
        self.act = nn.ReLU()

    def forward(
        self, x: torch.Tensor, past: torch.Tensor, rows: RowSlabs | None = None
    ) -> torch.Tensor:
        """``x``, ``past``: [N*T, C, H, W] (``past`` = the same input one frame earlier)."""
        out = torch.cat([x, past], dim=1)
        for layer in self.conv:
            out = _apply_layer(layer, out, rows)
        return self.act(out + self.skip(x))


class TGrow(nn.Module):
    """Temporal upsampler: each frame becomes ``stride`` frames via a 1x1 conv."""

    def __init__(self, num_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(num_channels, num_channels * stride, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N*T, C, H, W] -> [N*T*stride, C, H, W], time-major within each input frame."""
        num_channels = x.shape[1]
        x = self.conv(x)
        return x.reshape(-1, num_channels, *x.shape[2:])


class TAEHVDecoderNetwork(nn.Module):
    """TAEHV decoder stack, stored as ``blocks`` (an ``nn.Sequential``) so indices match upstream.

    Layout: Clamp, conv, ReLU, then per stage ``MemBlock x 3, Upsample, TGrow,
    conv``, then ReLU and a conv to RGB. Output is in [0, 1] before clamping.
    """

    def __init__(
        self,
        *,
        latent_channels: int,
        channels: tuple[int, ...],
        time_upscale: tuple[bool, ...],
        space_upscale: tuple[bool, ...],
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        num_stages = len(channels) - 1
        if len(time_upscale) != num_stages or len(space_upscale) != num_stages:
            raise ValueError(
                f"TAEHV decoder: {len(channels)} channel entries make {num_stages} upsampling "
                f"stages, so decoder_time_upscale and decoder_space_upscale need {num_stages} "
                f"entries each (got {len(time_upscale)} and {len(space_upscale)})"
            )
        layers: list[nn.Module] = [Clamp(), _conv3x3(latent_channels, channels[0]), nn.ReLU()]
        for stage in range(num_stages):
            width = channels[stage]
            layers += [MemBlock(width, width) for _ in range(3)]
            layers.append(nn.Upsample(scale_factor=2) if space_upscale[stage] else nn.Identity())
            layers.append(TGrow(width, 2 if time_upscale[stage] else 1))
            layers.append(_conv3x3(width, channels[stage + 1], bias=False))
        layers += [nn.ReLU(), _conv3x3(channels[-1], image_channels)]
        self.blocks = nn.Sequential(*layers)

    @property
    def num_memblocks(self) -> int:
        return sum(isinstance(layer, MemBlock) for layer in self.blocks)

    def forward(
        self,
        x: torch.Tensor,
        memory: list[torch.Tensor | None],
        rows: RowSlabs | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode a chunk of latent frames.

        Args:
            x: latent chunk [N, T, C, H, W].
            memory: per-``MemBlock`` input at the frame before this chunk
                ([N, C, H, W]), or ``None`` when nothing was decoded before.
            rows: set when ``x`` is one row slab of each frame (parallel decode).

        Returns:
            ``(frames [N, T', 3, H', W'], new_memory)`` where ``new_memory``
            holds each ``MemBlock``'s input at the last frame of this chunk.
        """
        assert len(memory) == self.num_memblocks
        num_batch = x.shape[0]
        new_memory: list[torch.Tensor] = []
        memblock_index = 0
        for layer in self.blocks:
            num_frames = x.shape[1]
            if isinstance(layer, MemBlock):
                previous = memory[memblock_index]
                if previous is None:
                    previous = torch.zeros_like(x[:, 0])
                # past[:, t] = x[:, t - 1], with the cached frame before t = 0.
                past = torch.cat([previous.unsqueeze(1), x[:, :-1]], dim=1)
                new_memory.append(x[:, -1])
                memblock_index += 1
                out = layer(x.flatten(0, 1), past.flatten(0, 1), rows)
            else:
                out = _apply_layer(layer, x.flatten(0, 1), rows)
            x = out.reshape(num_batch, -1, *out.shape[1:])
            assert x.shape[1] % num_frames == 0
        return x, new_memory


@dataclass(kw_only=True)
class TAEHVCache(StreamingDecoderCache):
    """Streaming state of :class:`TeahvVAEDecoder` across AR steps."""

    memory: list[torch.Tensor | None]
    """Per-``MemBlock`` input at the last decoded frame, [N, C, H, W]; ``None`` before any decode."""

    num_decoded_latent_frames: int = 0
    """Latent frames decoded so far; the start-of-video trim happens only while this is 0."""

    rows: RowSlabs | None = None
    """Set when this cache decodes one row slab of each frame (parallel decode)."""


@dataclass(kw_only=True)
class TeahvVAEDecoderConfig(DecoderConfig):
    """Config for :class:`TeahvVAEDecoder`; defaults are the ``lighttae`` Wan 2.1 decoder."""

    _target: type[TeahvVAEDecoder] = field(default_factory=lambda: TeahvVAEDecoder)
    """Always :class:`TeahvVAEDecoder`."""

    checkpoint_path: str | None = AVAILABLE_TAEHV_CHECKPOINT_PATHS["lighttae"]
    """Local TAEHV checkpoint (``.pth`` / ``.safetensors``). The default names the upstream
    ``lighttae`` file, which is never downloaded: fetch it and point here. ``None`` keeps the
    random initialisation (tests and demos only)."""

    state_dict_transform: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = (
        lighttae_state_dict_transform
    )
    """Remap applied to the loaded state dict before it is copied into the module;
    ``None`` loads the keys as they are (they must then be ``decoder.blocks.<i>.*``)."""

    dtype: torch.dtype = torch.bfloat16
    """Parameter and compute dtype."""

    use_cuda_graph: bool = True
    """On CUDA, compile with ``mode="reduce-overhead"`` (CUDA-graph replay). Ignored on CPU."""

    use_compile: bool = True
    """On CUDA, ``torch.compile`` the network. Ignored on CPU (logged once)."""

    latent_channels: int = 16
    """Latent channels (16 for Wan 2.1)."""

    decoder_channels: tuple[int, ...] = (256, 128, 64, 64)
    """Channel width entering each decoder stage, then the width before the RGB conv."""

    decoder_time_upscale: tuple[bool, ...] = (False, True, True)
    """Per stage: whether its ``TGrow`` doubles the frame count."""

    decoder_space_upscale: tuple[bool, ...] = (True, True, True)
    """Per stage: whether it doubles height and width."""

    unnormalize_latent: bool | None = None
    """Decode ``z * latent_std + latent_mean`` instead of the DiT's normalised latent ``z``.
    The checkpoint decides: LightX2V's ``lighttae*`` files were trained on un-normalised
    latents (LightX2V un-normalises before them), madebyollin's ``taew2_1`` / ``taew2_2``
    on the normalised one. ``None`` picks by the checkpoint's file name
    (:data:`RAW_LATENT_CHECKPOINT_PREFIXES`: on for ``lighttae*``, off otherwise and
    for random weights); set it when a file was renamed."""

    latent_mean: tuple[float, ...] | None = None
    """Per-channel latent mean for ``unnormalize_latent``; ``None``: Wan 2.1's for 16
    latent channels, Wan 2.2's for 48."""

    latent_std: tuple[float, ...] | None = None
    """Per-channel latent std for ``unnormalize_latent``; ``None`` as for ``latent_mean``."""


class TeahvVAEDecoder(StreamingVideoDecoder[TAEHVCache]):
    """TAEHV light decoder: latent [..., Tl, Cl, Hl, Wl] -> video [..., T, 3, H, W] in [-1, 1].

    The input is the DiT's normalised latent; checkpoints trained on raw latents
    (``lighttae*``, see ``unnormalize_latent``) get it un-normalised first.

    The first decoded chunk drops the first ``time_upscale - 1`` frames, as
    upstream TAEHV does, so ``Tl`` latents give ``1 + 4 * (Tl - 1)`` frames at
    the start of a video and ``4 * Tl`` frames afterwards.
    """

    supports_row_slabs = True

    def __init__(self, config: TeahvVAEDecoderConfig) -> None:
        super().__init__(config)
        self.config: TeahvVAEDecoderConfig = config
        self.decoder = TAEHVDecoderNetwork(
            latent_channels=config.latent_channels,
            channels=tuple(config.decoder_channels),
            time_upscale=tuple(config.decoder_time_upscale),
            space_upscale=tuple(config.decoder_space_upscale),
        )
        self._time_upscale = 2 ** sum(bool(flag) for flag in config.decoder_time_upscale)
        self._space_upscale = 2 ** sum(bool(flag) for flag in config.decoder_space_upscale)
        self.frames_to_trim = self._time_upscale - 1
        self.unnormalize_latent = (
            checkpoint_takes_raw_latents(config.checkpoint_path)
            if config.unnormalize_latent is None
            else config.unnormalize_latent
        )
        # [C] fp32 statistics of the latent normalisation; used only with unnormalize_latent.
        self._latent_mean: torch.Tensor | None = None
        self._latent_std: torch.Tensor | None = None
        if self.unnormalize_latent:
            self._latent_mean, self._latent_std = self._latent_statistics()
        if config.checkpoint_path is not None:
            self.load_from_checkpoint(config.checkpoint_path)
        self.to(config.dtype)
        self._compiled_network: Callable[..., Any] | None = None
        self._compile_checked = False

    def _latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        mean, std = config.latent_mean, config.latent_std
        if mean is None or std is None:
            default_mean, default_std = _wan_latent_statistics(config.latent_channels)
            mean = default_mean if mean is None else mean
            std = default_std if std is None else std
        if len(mean) != config.latent_channels or len(std) != config.latent_channels:
            raise ValueError(
                f"TAEHV: latent_mean and latent_std need latent_channels={config.latent_channels} "
                f"entries; got {len(mean)} and {len(std)}"
            )
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def load_from_checkpoint(self, checkpoint_path: str) -> None:
        """Load weights from a local file, applying ``config.state_dict_transform``."""
        local = resolve_local_checkpoint(checkpoint_path, what="TAEHV decoder checkpoint")
        state_dict = load_checkpoint(local)
        if self.config.state_dict_transform is not None:
            state_dict = self.config.state_dict_transform(state_dict)
        load_state_dict_into_module(self, state_dict, source=f"TAEHV checkpoint '{local}'")

    @property
    def spatial_compression_ratio(self) -> int:
        return self._space_upscale

    @property
    def temporal_compression_ratio(self) -> int:
        return self._time_upscale

    def get_output_temporal_size(self, autoregressive_index: int, input_temporal_size: int) -> int:
        """AR 0: ``1 + r * (Tl - 1)`` frames (start trim); AR >= 1: ``r * Tl``."""
        if autoregressive_index == 0:
            return input_temporal_size * self._time_upscale - self.frames_to_trim
        return input_temporal_size * self._time_upscale

    def get_input_temporal_size(self, autoregressive_index: int, output_temporal_size: int) -> int:
        """Inverse of :meth:`get_output_temporal_size`; raises if the count is not reachable."""
        padded = output_temporal_size + (self.frames_to_trim if autoregressive_index == 0 else 0)
        if output_temporal_size <= 0 or padded % self._time_upscale != 0:
            rule = (
                f"1 + {self._time_upscale} * k"
                if autoregressive_index == 0
                else f"{self._time_upscale} * k"
            )
            raise ValueError(
                f"TAEHV cannot produce {output_temporal_size} frames at AR step "
                f"{autoregressive_index}: the count must be {rule} for an integer k >= 1"
            )
        return padded // self._time_upscale

    def initialize_autoregressive_cache(
        self, rows: RowSlabs | None = None, **context: Any
    ) -> TAEHVCache:
        """A fresh cache; with ``rows`` it decodes that row slab of each frame (parallel decode)."""
        return TAEHVCache(memory=[None] * self.decoder.num_memblocks, rows=rows)

    def _network(self, device: torch.device) -> Callable[..., Any]:
        """The network to call: compiled on CUDA when asked, eager otherwise."""
        if not self._compile_checked:
            self._compile_checked = True
            wants_compile = self.config.use_compile or self.config.use_cuda_graph
            if wants_compile and device.type != "cuda":
                logger.info("TAEHV: use_compile/use_cuda_graph need CUDA; running eagerly on CPU")
            elif wants_compile:
                mode = "reduce-overhead" if self.config.use_cuda_graph else None
                self._compiled_network = torch.compile(self.decoder, mode=mode, dynamic=False)
        return self.decoder if self._compiled_network is None else self._compiled_network

    @torch.no_grad()
    def forward(
        self,
        input: torch.Tensor,
        autoregressive_index: int = 0,
        cache: TAEHVCache | None = None,
    ) -> torch.Tensor:
        """Decode one latent chunk; the cache (fresh when ``None``) is advanced in place.

        ``autoregressive_index`` is not needed: whether the start-of-video frames
        are trimmed follows from the cache (only before anything was decoded).
        """
        if input.ndim < 4:
            raise ValueError(
                f"TAEHV expects a latent [..., Tl, Cl, Hl, Wl]; got shape {tuple(input.shape)}"
            )
        if input.shape[-3] != self.config.latent_channels:
            raise ValueError(
                f"TAEHV expects {self.config.latent_channels} latent channels at dim -3; "
                f"got shape {tuple(input.shape)}"
            )
        if cache is None:
            cache = self.initialize_autoregressive_cache()
        leading_shape = input.shape[:-4]
        latent = input.reshape(-1, *input.shape[-4:])
        if self.unnormalize_latent:
            # [N, T, C, H, W] * [C, 1, 1] + [C, 1, 1], in fp32
            mean = self._latent_mean.to(latent.device).view(-1, 1, 1)
            std = self._latent_std.to(latent.device).view(-1, 1, 1)
            latent = latent.float() * std + mean
        latent = latent.to(self.config.dtype)
        # A row slab talks to its neighbours inside the network: run it eagerly.
        network = self.decoder if cache.rows is not None else self._network(latent.device)
        frames, memory = network(latent, cache.memory, cache.rows)
        if network is not self.decoder:
            # CUDA-graph outputs live in pooled buffers that the next replay overwrites.
            frames, memory = frames.clone(), [m.clone() for m in memory]
        cache.memory = memory
        if cache.num_decoded_latent_frames == 0:
            frames = frames[:, self.frames_to_trim :]
        cache.num_decoded_latent_frames += latent.shape[1]
        video = frames.clamp(0, 1) * 2 - 1
        return video.reshape(*leading_shape, *video.shape[1:]).to(input.dtype)
