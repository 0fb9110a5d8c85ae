"""Building blocks of the Wan 2.1 / 2.2 causal video VAE, streamed through a per-conv frame cache.

Parameter names follow the original Wan repository (``wan/modules/vae.py`` and
``vae2_2.py``): ``encoder.conv1``, ``encoder.downsamples.*``, ``encoder.middle.*``,
``encoder.head.*``, ``conv1`` / ``conv2`` (the quant convs) and ``decoder.*``,
so the original ``Wan2.1_VAE.pth`` loads without any remap.

Shape legend used in comments: b batch, c channels, t frames, h / w height / width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flashdreams.core.distributed.row_slabs import RowSlabs

NUM_CACHED_FRAMES = 2
"""Frames a causal 3x3x3 conv needs from the previous chunk."""


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """``channels_last_3d`` for a channels-last video tensor, else the default layout."""
    if (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available()


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether to call oneDNN's convolution directly (CPU fp32 inference, eager only:
    under ``torch.compile`` the plain convolution lets inductor choose, and dynamo
    does not trace ``torch.backends`` queries, which would break the graph here)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and _ONEDNN_AVAILABLE
        and torch.backends.mkldnn.enabled
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
) -> torch.Tensor:
    """2D or 3D convolution (dilation 1, one group); on CPU fp32 always through oneDNN.

    For batch-1 inputs with few channels or frames, torch's dispatcher picks its im2col
    kernel, which measured 2-4x slower than oneDNN on the VAE's low-resolution stages
    (bench/RESULTS.md, "Wan VAE decode"); oneDNN also keeps channels-last inputs
    channels-last.
    """
    if _use_onednn(x, weight):
        num_spatial = x.dim() - 2
        return torch.ops.aten.mkldnn_convolution(
            x, weight, bias, list(padding), list(stride), [1] * num_spatial, 1
        )
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    return conv(x, weight, bias, stride, padding)


def _without_row_padding(padding: tuple[int, ...]) -> tuple[int, ...]:
    """``padding`` with the height entry (second to last) set to 0."""
    return (*padding[:-2], 0, padding[-1])


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding, one group) that goes through :func:`convolution`."""

    def forward(self, x: torch.Tensor, rows: RowSlabs | None = None) -> torch.Tensor:
        """With ``rows``, ``x`` is a row slab: its height padding comes from the neighbours."""
        padding = tuple(self.padding)
        if rows is not None:
            x = rows.pad_rows(x, padding[-2])
            padding = _without_row_padding(padding)
        return convolution(x, self.weight, self.bias, self.stride, padding)  # type: ignore[arg-type]


class CausalConv3d(nn.Conv3d):
    """3D conv padded only towards the past in time; the past may come from a cache.

    Height and width are zero-padded inside the convolution; time gets
    ``2 * padding[0]`` frames in front: the cached frames of the previous chunk,
    zeros where there are none.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pad_t, pad_h, pad_w = self.padding
        self._num_past_frames = 2 * pad_t
        self._spatial_padding = (0, pad_h, pad_w)
        self.padding = (0, 0, 0)

    @property
    def num_halo_rows(self) -> int:
        """Rows a row slab needs from each neighbour (the height padding)."""
        return self._spatial_padding[1]

    def _time_padded(
        self, x: torch.Tensor, cached: torch.Tensor | None, num_halo_rows: int = 0
    ) -> torch.Tensor:
        """``[b, c, num_past + t, num_halo_rows + h + num_halo_rows, w]``: the cached frames (zeros
        where there are none), then ``x``; the current frames' halo rows are left to the caller."""
        num_past = self._num_past_frames
        b, c, t, h, w = x.shape
        padded = torch.empty(
            (b, c, num_past + t, h + 2 * num_halo_rows, w),
            dtype=x.dtype,
            device=x.device,
            memory_format=_memory_format(x),
        )
        num_cached = 0 if cached is None else min(cached.shape[2], num_past)
        padded[:, :, : num_past - num_cached].zero_()
        if num_cached:
            padded[:, :, num_past - num_cached : num_past].copy_(cached[:, :, -num_cached:])
        padded[:, :, num_past:, num_halo_rows : num_halo_rows + h].copy_(x)
        return padded

    def forward(self, x: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        if self._num_past_frames:
            x = self._time_padded(x, cached)
        return convolution(x, self.weight, self.bias, self.stride, self._spatial_padding)  # type: ignore[arg-type]

    def forward_slab(
        self, x: torch.Tensor, cached: torch.Tensor | None, rows: RowSlabs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` of one row slab; ``cached`` holds the past frames with their halo rows.

        The neighbours' boundary rows go straight into the time-padded input (no extra
        copy of the slab). Returns the output and the input's last frames, halo rows
        included: the cache of the next chunk.
        """
        num_rows = self.num_halo_rows
        above, below = rows.exchange_rows(x, num_rows)
        padded = self._time_padded(x, cached, num_rows)
        num_past = self._num_past_frames
        padded[:, :, num_past:, :num_rows].copy_(above)
        padded[:, :, num_past:, -num_rows:].copy_(below)
        out = convolution(
            padded, self.weight, self.bias, self.stride, _without_row_padding(self._spatial_padding)
        )  # type: ignore[arg-type]
        return out, padded[:, :, -NUM_CACHED_FRAMES:].clone()


class RMSNorm(nn.Module):
    """L2 normalisation over channels, times ``sqrt(C) * gamma`` (plus an optional bias)."""

    def __init__(self, dim: int, *, images: bool = True, bias: bool = False) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 (the norm of many channels overflows bf16 badly); the
        # reciprocal norm is one value per pixel, so the full-size work is two products.
        x_float = x.float()
        inv_norm = torch.linalg.vector_norm(x_float, dim=1, keepdim=True)
        inv_norm = inv_norm.clamp_min_(1e-12).reciprocal_()
        out = (x_float * inv_norm).mul_(self.gamma.float() * self.scale)
        if self.bias is not None:
            out.add_(self.bias.float())
        return out.to(x.dtype)


class FeatureCache:
    """Cached trailing frames of every causal conv of one encoder or decoder.

    The convs are visited in the same order on every chunk, so a cursor that is
    reset at the start of each chunk gives each conv its own slot.
    """

    FIRST_CHUNK_SEEN = "first-chunk-seen"
    """Marker of a temporal upsampler that has seen the first chunk (which it does not double)."""

    def __init__(self, num_slots: int, rows: RowSlabs | None = None) -> None:
        self.slots: list[Any] = [None] * num_slots
        self.cursor = 0
        self.rows = rows
        """Set when this cache belongs to one row slab of each frame (parallel decode)."""

    def next_slot(self) -> int:
        index = self.cursor
        self.cursor += 1
        return index


def _cache_tail(x: torch.Tensor, previous: Any) -> torch.Tensor:
    """The last ``NUM_CACHED_FRAMES`` frames of ``x``, topped up from ``previous`` if ``x`` is short."""
    tail = x[:, :, -NUM_CACHED_FRAMES:].clone()
    if tail.shape[2] < NUM_CACHED_FRAMES and isinstance(previous, torch.Tensor):
        tail = torch.cat([previous[:, :, -1:].to(tail.device), tail], dim=2)
    return tail


def cached_conv(conv: CausalConv3d, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    """Run ``conv`` with the frames cached from the previous chunk, then cache this chunk's tail."""
    slot = cache.next_slot()
    previous = cache.slots[slot]
    if cache.rows is not None and conv.num_halo_rows > 0:
        # The cached frames keep their halo rows: later chunks exchange only their own frames.
        out, cache.slots[slot] = conv.forward_slab(x, previous, cache.rows)
        return out
    tail = _cache_tail(x, previous)
    out = conv(x, previous)
    cache.slots[slot] = tail
    return out


class _Fp32Upsample(nn.Upsample):
    """Nearest-exact upsampling computed in fp32 (not every backend supports it in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """Spatial 2x up/down-sampling, optionally with a causal 2x temporal up/down-sampling."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                _Fp32Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                Conv2d(dim, upsample_out_dim or dim // 2, 3, padding=1),
            )
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)), Conv2d(dim, dim, 3, stride=(2, 2))
            )
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(
                    dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0)
                )
        else:
            raise ValueError(f"unknown resample mode '{mode}'")

    def _upsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        slot = cache.next_slot()
        previous = cache.slots[slot]
        if previous is None:
            # The first chunk of a video is not doubled in time (causal first frame).
            cache.slots[slot] = FeatureCache.FIRST_CHUNK_SEEN
            return x
        tail = x[:, :, -NUM_CACHED_FRAMES:].clone()
        if tail.shape[2] < NUM_CACHED_FRAMES:
            before = (
                previous[:, :, -1:].to(tail.device)
                if isinstance(previous, torch.Tensor)
                else torch.zeros_like(tail)
            )
            tail = torch.cat([before, tail], dim=2)
        x = self.time_conv(x, previous if isinstance(previous, torch.Tensor) else None)
        cache.slots[slot] = tail
        # [b, 2c, t, h, w] -> [b, c, 2t, h, w]: the two channel halves interleave in time
        # (written into an output that keeps the input's memory layout).
        out = torch.empty(
            (b, c, 2 * t, h, w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
        )
        out[:, :, 0::2] = x[:, :c]
        out[:, :, 1::2] = x[:, c:]
        return out

    def _downsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        slot = cache.next_slot()
        previous = cache.slots[slot]
        if previous is None:
            # The first chunk (one frame) passes through; its frame becomes the past.
            cache.slots[slot] = x.clone()
            return x
        tail = x[:, :, -1:].clone()
        x = self.time_conv(torch.cat([previous[:, :, -1:], x], dim=2))
        cache.slots[slot] = tail
        return x

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        b, _, t, _, _ = x.shape
        frames = x.transpose(1, 2).flatten(0, 1)  # [(b t), c, h, w]
        if self.mode.startswith("upsample"):
            upsample, conv = self.resample
            frames = conv(upsample(frames), cache.rows)
        else:
            assert cache.rows is None, "row slabs are for decoding only"
            frames = self.resample(frames)
        x = frames.unflatten(0, (b, t)).transpose(1, 2)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, causal conv) twice, plus a 1x1x1 conv shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(inplace=True),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(inplace=True),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        shortcut = self.shortcut(x)
        for layer in self.residual:
            x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across frames)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = Conv2d(dim, dim * 3, 1)
        self.proj = Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        frames = self.norm(x.transpose(1, 2).flatten(0, 1))  # [(b t), c, h, w]
        # [(b t), 3c, h, w] -> [(b t), 1, h*w, 3c] -> q, k, v of [(b t), 1, h*w, c]
        qkv = self.to_qkv(frames)  # [(b t), 3c, h, w]
        q, kv = qkv[:, :c], qkv[:, c:]
        if cache is not None and cache.rows is not None:
            kv = cache.rows.all_gather_rows(kv)  # a row slab's queries see the whole frame
        # [(b t), c, h, w] -> [(b t), 1, h*w, c]; keys and values over all rows of the frame
        q = q.reshape(b * t, 1, c, h * w).transpose(-1, -2).contiguous()
        kv = kv.reshape(b * t, 1, 2 * c, -1).transpose(-1, -2)
        k, v = (part.contiguous() for part in kv.chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(out).unflatten(0, (b, t)).transpose(1, 2)
        return out.add_(identity).contiguous(memory_format=_memory_format(identity))


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a Wan 2.2 down stage: pack space-time blocks into channels, average."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.factor_t = factor_t
        self.factor_s = factor_s
        factor = factor_t * factor_s * factor_s
        if (in_dim * factor) % out_dim != 0:
            raise ValueError(
                f"AvgDown3D: in_dim * factor ({in_dim} * {factor}) must be divisible by out_dim ({out_dim})"
            )
        self.group_size = in_dim * factor // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        # [b, c, (t ft), (h fs), (w fs)] -> [b, (c ft fs fs), t, h, w]
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, -1, t // ft, h // fs, w // fs)
        return x.unflatten(1, (self.out_dim, self.group_size)).mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of a Wan 2.2 up stage: repeat channels, unpack them into space-time."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.factor_t = factor_t
        self.factor_s = factor_s
        factor = factor_t * factor_s * factor_s
        assert (out_dim * factor) % in_dim == 0
        self.repeats = out_dim * factor // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        # [b, (c ft fs fs), t, h, w] -> [b, c, (t ft), (h fs), (w fs)]
        x = x.reshape(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class DownResidualBlock(nn.Module):
    """Wan 2.2 down stage: residual blocks (+ resample) plus an ``AvgDown3D`` shortcut."""

    def __init__(
        self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool
    ) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(
            in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if spatial else 1
        )
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if spatial:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = layer(x, cache)
        return x + shortcut


class UpResidualBlock(nn.Module):
    """Wan 2.2 up stage: residual blocks (+ resample) plus a ``DupUp3D`` shortcut when upsampling."""

    def __init__(
        self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, spatial: bool
    ) -> None:
        super().__init__()
        self.avg_shortcut = (
            DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2) if spatial else None
        )
        layers: list[nn.Module] = []
        for _ in range(num_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if spatial:
            mode = "upsample3d" if temporal else "upsample2d"
            layers.append(Resample(out_dim, mode, upsample_out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        out = x
        for layer in self.upsamples:
            out = layer(out, cache)
        if self.avg_shortcut is not None:
            out = out + self.avg_shortcut(x, first_chunk)
        return out


def _run(layers: nn.Sequential, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x = cached_conv(layer, x, cache)
        elif isinstance(layer, (ResidualBlock, AttentionBlock, Resample, DownResidualBlock)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        RMSNorm(dim, images=False),
        nn.SiLU(inplace=True),
        CausalConv3d(dim, out_channels, 3, padding=1),
    )


class Encoder3d(nn.Module):
    """Causal video encoder: ``[b, in_channels, t, H, W]`` -> ``[b, z_dim, t', H/s, W/s]``."""

    def __init__(
        self,
        *,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_downsample: tuple[bool, ...],
        is_residual: bool,
        in_channels: int,
    ) -> None:
        super().__init__()
        dims = [dim * multiplier for multiplier in (1, *dim_mult)]
        num_stages = len(dim_mult)
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        stages: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            is_last = i == num_stages - 1
            if is_residual:
                temporal = not is_last and bool(temporal_downsample[i])
                stages.append(
                    DownResidualBlock(in_dim, out_dim, num_res_blocks, temporal, not is_last)
                )
                continue
            for _ in range(num_res_blocks):
                stages.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if not is_last:
                mode = "downsample3d" if temporal_downsample[i] else "downsample2d"
                stages.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*stages)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z_dim)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = cached_conv(self.conv1, x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return _run(self.head, x, cache)


class Decoder3d(nn.Module):
    """Causal video decoder: ``[b, z_dim, t, h, w]`` -> ``[b, out_channels, t', h*s, w*s]``."""

    def __init__(
        self,
        *,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temporal_upsample: tuple[bool, ...],
        is_residual: bool,
        out_channels: int,
    ) -> None:
        super().__init__()
        dims = [dim * multiplier for multiplier in (dim_mult[-1], *dim_mult[::-1])]
        num_stages = len(dim_mult)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        stages: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            is_last = i == num_stages - 1
            if is_residual:
                temporal = not is_last and bool(temporal_upsample[i])
                stages.append(
                    UpResidualBlock(in_dim, out_dim, num_res_blocks + 1, temporal, not is_last)
                )
                continue
            if i > 0:
                in_dim = in_dim // 2  # the previous 2.1 upsampler halved the channels
            for _ in range(num_res_blocks + 1):
                stages.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if not is_last:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                stages.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*stages)
        self.head = _head(dims[-1], out_channels)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        x = cached_conv(self.conv1, x, cache)
        x = _run(self.middle, x, cache)
        for stage in self.upsamples:
            x = (
                stage(x, cache, first_chunk)
                if isinstance(stage, UpResidualBlock)
                else stage(x, cache)
            )
        return _run(self.head, x, cache)


def count_causal_convs(module: nn.Module) -> int:
    """Number of cache slots ``module`` can use (one per causal conv, an upper bound)."""
    return sum(1 for m in module.modules() if isinstance(m, CausalConv3d))
