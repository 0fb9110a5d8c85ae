"""Building blocks of the Wan 2.1 causal video VAE, streaming through a per-conv frame cache."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CACHED_FRAMES = 2
"""Frames a causal 3x3x3 conv needs from the previous call."""


class CausalConv3d(nn.Conv3d):
    """3D conv padded only towards the past in time; past frames may come from a cache."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pad_t, pad_h, pad_w = self.padding
        self._causal_padding = (pad_w, pad_w, pad_h, pad_h, 2 * pad_t, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        padding = list(self._causal_padding)
        if cached is not None and padding[4] > 0:
            x = torch.cat([cached.to(x.device, x.dtype), x], dim=2)
            padding[4] -= cached.shape[2]
        return super().forward(F.pad(x, padding))


class RMSNorm(nn.Module):
    """L2 normalisation over channels times ``sqrt(C) * gamma`` (+ bias)."""

    def __init__(self, dim: int, *, images: bool = True, bias: bool = False) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.normalize(x, dim=1) * self.scale * self.gamma
        return out + self.bias if self.bias is not None else out


class FeatureCache:
    """Per-conv cached frames of one streaming encode or decode, visited in a fixed order."""

    REPEAT = "repeat"

    def __init__(self, num_slots: int) -> None:
        self.slots: list[Any] = [None] * num_slots
        self.cursor = 0

    def next_slot(self) -> int:
        index = self.cursor
        self.cursor += 1
        return index


def _cached_conv(conv: CausalConv3d, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    """Run ``conv`` with the frames cached from the previous call, then store this call's tail."""
    if cache is None:
        return conv(x)
    slot = cache.next_slot()
    tail = x[:, :, -NUM_CACHED_FRAMES:].clone()
    previous = cache.slots[slot]
    if tail.shape[2] < NUM_CACHED_FRAMES and previous is not None:
        tail = torch.cat([previous[:, :, -1:].to(tail.device), tail], dim=2)
    out = conv(x, previous)
    cache.slots[slot] = tail
    return out


class _Fp32Upsample(nn.Upsample):
    """Nearest upsampling computed in fp32 (bf16 nearest-exact is not supported everywhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """Spatial (and optionally causal temporal) 2x up- or down-sampling."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "upsample2d" or mode == "upsample3d":
            self.resample = nn.Sequential(
                _Fp32Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample2d" or mode == "downsample3d":
            self.resample = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2))
            )
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(
                    dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0)
                )
        else:
            raise ValueError(f"unknown resample mode '{mode}'")

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        # Shape legend: b batch, c channels, t frames, h/w spatial.
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and cache is not None:
            slot = cache.next_slot()
            previous = cache.slots[slot]
            if previous is None:
                # The very first latent frame is not doubled in time.
                cache.slots[slot] = FeatureCache.REPEAT
            else:
                tail = x[:, :, -NUM_CACHED_FRAMES:].clone()
                if tail.shape[2] < NUM_CACHED_FRAMES:
                    before = (
                        torch.zeros_like(tail[:, :, -1:])
                        if isinstance(previous, str)
                        else previous[:, :, -1:].to(tail.device)
                    )
                    tail = torch.cat([before, tail], dim=2)
                x = self.time_conv(x) if isinstance(previous, str) else self.time_conv(x, previous)
                cache.slots[slot] = tail
                # [b, 2c, t, h, w] -> [b, c, 2t, h, w], the two halves interleaved in time
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), dim=3).reshape(b, c, t * 2, h, w)
        num_frames = x.shape[2]
        frames = x.transpose(1, 2).flatten(0, 1)  # [(b t), c, h, w]
        frames = self.resample(frames)
        x = frames.unflatten(0, (b, num_frames)).transpose(1, 2)
        if self.mode == "downsample3d" and cache is not None:
            slot = cache.next_slot()
            previous = cache.slots[slot]
            if previous is None:
                cache.slots[slot] = x.clone()
            else:
                tail = x[:, :, -1:].clone()
                x = self.time_conv(torch.cat([previous[:, :, -1:], x], dim=2))
                cache.slots[slot] = tail
        return x


class ResidualBlock(nn.Module):
    """RMSNorm-SiLU-CausalConv twice, with a 1x1x1 conv shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        shortcut = self.shortcut(x)
        for layer in self.residual:
            x = _cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        frames = self.norm(x.transpose(1, 2).flatten(0, 1))  # [(b t), c, h, w]
        # [(b t), 3c, h, w] -> 3 x [(b t), 1, h*w, c]
        q, k, v = (
            self.to_qkv(frames).reshape(b * t, 1, c * 3, h * w).transpose(-1, -2).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(out).unflatten(0, (b, t)).transpose(1, 2)
        return out + identity


def _run_layers(layers: nn.Sequential, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x = _cached_conv(layer, x, cache)
        elif isinstance(layer, (ResidualBlock, AttentionBlock, Resample)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_downsample: tuple[bool, ...],
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temporal_downsample[i] else "downsample2d"
                downsamples.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1]),
            AttentionBlock(dims[-1]),
            ResidualBlock(dims[-1], dims[-1]),
        )
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], z_dim, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = _cached_conv(self.conv1, x, cache)
        x = _run_layers(self.downsamples, x, cache)
        x = _run_layers(self.middle, x, cache)
        return _run_layers(self.head, x, cache)


class Decoder3d(nn.Module):
    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_upsample: tuple[bool, ...],
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0]),
        )
        upsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # the previous Resample halved the channels
            for _ in range(num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                upsamples.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = _cached_conv(self.conv1, x, cache)
        x = _run_layers(self.middle, x, cache)
        x = _run_layers(self.upsamples, x, cache)
        return _run_layers(self.head, x, cache)


def _count_cache_slots(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, CausalConv3d))


class WanVAE(nn.Module):
    """The Wan 2.1 VAE (original key layout: ``encoder.*``, ``conv1``, ``conv2``, ``decoder.*``).

    Either half may be left out (``with_encoder`` / ``with_decoder``) so the
    streaming encoder and decoder modules carry only the weights they use.
    """

    def __init__(
        self,
        *,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_downsample: tuple[bool, ...],
        with_encoder: bool = True,
        with_decoder: bool = True,
        decoder_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        if with_encoder:
            self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample)
            self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        if with_decoder:
            self.conv2 = CausalConv3d(z_dim, z_dim, 1)
            self.decoder = Decoder3d(
                decoder_dim or dim,
                z_dim,
                dim_mult,
                num_res_blocks,
                tuple(temporal_downsample[::-1]),
            )

    def new_encoder_cache(self) -> FeatureCache:
        return FeatureCache(_count_cache_slots(self.encoder))

    def new_decoder_cache(self) -> FeatureCache:
        return FeatureCache(_count_cache_slots(self.decoder))

    def encode_mean(
        self, video: torch.Tensor, cache: FeatureCache, first_call: bool
    ) -> torch.Tensor:
        """``video [B, 3, F, H, W]`` -> posterior mean ``[B, z, T, h, w]``.

        The first call of a rollout encodes the first frame alone, then groups
        of 4; later calls take groups of 4 only (the causal cache carries over).
        """
        num_frames = video.shape[2]
        groups: list[tuple[int, int]] = []
        start = 0
        if first_call:
            groups.append((0, 1))
            start = 1
        if (num_frames - start) % 4:
            raise ValueError(
                f"got {num_frames} frames: the encoder needs "
                f"{'1 + 4k' if first_call else '4k'} frames at this AR step"
            )
        groups += [(s, s + 4) for s in range(start, num_frames, 4)]
        outputs = []
        for begin, end in groups:
            cache.cursor = 0
            outputs.append(self.encoder(video[:, :, begin:end], cache))
        mean, _log_var = self.conv1(torch.cat(outputs, dim=2)).chunk(2, dim=1)
        return mean

    def decode(self, latent: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """``latent [B, z, T, h, w]`` (unnormalised) -> video ``[B, 3, F, H, W]`` clamped to [-1, 1]."""
        x = self.conv2(latent)
        outputs = []
        for index in range(x.shape[2]):
            cache.cursor = 0
            outputs.append(self.decoder(x[:, :, index : index + 1], cache))
        return torch.cat(outputs, dim=2).clamp(-1.0, 1.0)


def wan21_diffusers_vae_state_dict_transform(
    state_dict: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKLWan`` (Wan 2.1 layout) state dict to the original Wan keys.

    Purely structural: no tensor is copied or reshaped. The decoder's flat
    block index depends on ``num_res_blocks``, read off the up-block keys.
    """
    import re

    up_resnet_ids = [
        int(m.group(1))
        for key in state_dict
        if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", key))
    ]
    blocks_per_stage = (max(up_resnet_ids) + 1 if up_resnet_ids else 3) + 1  # resnets + upsampler

    resnet_parts = {
        "norm1": "residual.0",
        "conv1": "residual.2",
        "norm2": "residual.3",
        "conv2": "residual.6",
        "conv_shortcut": "shortcut",
    }

    def rename(key: str) -> str:
        for old, new in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
            if key.startswith(old):
                return new + key[len(old) :]
        key = (
            key.replace(".conv_in.", ".conv1.")
            .replace(".norm_out.", ".head.0.")
            .replace(".conv_out.", ".head.2.")
        )
        key = re.sub(r"\.mid_block\.resnets\.0\.", ".middle.0.", key)
        key = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", key)
        key = re.sub(r"\.mid_block\.resnets\.1\.", ".middle.2.", key)
        key = re.sub(r"encoder\.down_blocks\.", "encoder.downsamples.", key)
        key = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.upsamples.{int(m.group(1)) * blocks_per_stage + int(m.group(2))}.",
            key,
        )
        key = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: (
                f"decoder.upsamples.{int(m.group(1)) * blocks_per_stage + blocks_per_stage - 1}."
            ),
            key,
        )
        key = (
            re.sub(
                r"\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias|gamma)$",
                lambda m: f".{resnet_parts[m.group(1)]}.{m.group(2)}",
                key,
            )
            if re.search(
                r"(downsamples|upsamples|middle)\.\d+\.(norm1|conv1|norm2|conv2|conv_shortcut)\.",
                key,
            )
            else key
        )
        return key

    return {rename(key): tensor for key, tensor in state_dict.items()}
