"""Self-attention KV cache: a fixed sink plus a rolling window, preallocated.

Storage of one cache (per transformer block)::

    k, v   [B, sink_size + window_size + chunk_size, H, D]
           |<- sink ->|<---- window ---->|<- current ->|
    valid  [sink_size + window_size + chunk_size] bool, False = padding key

Tokens are kept in the order they were written. The first ``sink_size``
tokens ever committed stay forever (the attention sink); the window keeps
the most recent ``window_size`` committed tokens after them. The slot right
after the committed tokens receives the current chunk's K/V on every call,
so attention reads one contiguous prefix ``[:num_filled + n]`` with no
concatenation. Memory never grows: once the window is full, committing a
chunk shifts the window left in place and drops its oldest tokens.

Quantised storage (``quantization="int8"`` or ``"fp8_e4m3"``) keeps ``k`` / ``v`` as
int8 or float8 e4m3 with one bf16 scale per token and head::

    k, v            [B, capacity, H, D]  int8 / float8_e4m3fn
    k_scale, v_scale [B, capacity, H, 1] bf16, scale = amax over D / (127 or 448)

:meth:`stage` dequantises the committed tokens to the compute dtype of the incoming
chunk and hands the chunk itself to attention unquantised, so only K/V read back from
the cache carry the rounding. The scales are per token and head, so a token's stored
value does not depend on how tokens or heads are split across context-parallel ranks.
Bytes per element: 1 + 2 / D (0.51x of bf16 at D = 128).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KV_CACHE_QUANTIZATIONS = ("none", "int8", "fp8_e4m3")
"""Storage modes of :class:`KVCache`: the compute dtype, int8 or float8 e4m3 with scales."""

_STORAGE = {"int8": (torch.int8, 127.0), "fp8_e4m3": (torch.float8_e4m3fn, 448.0)}
_SCALE_DTYPE = torch.bfloat16


def quantize_per_token_head(
    x: torch.Tensor, quantization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> (``q`` in the storage dtype, ``scale [..., 1]`` bf16), symmetric.

    The scale is rounded to bf16 before dividing, so ``q * scale`` reproduces ``x`` up to
    the storage rounding alone.
    """
    storage_dtype, max_value = _STORAGE[quantization]
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / max_value, torch.ones_like(amax)).to(_SCALE_DTYPE)
    scaled = x.float() / scale.float()
    if storage_dtype == torch.int8:
        scaled = scaled.round()
    return scaled.clamp(-max_value, max_value).to(storage_dtype), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_per_token_head`, in ``dtype``."""
    return (q.float() * scale.float()).to(dtype)


@dataclass
class KVCacheCounters:
    """Python-side bookkeeping, shared between a cache and its batch slices."""

    num_filled: int = 0
    """Committed tokens held (sink + window part), at most ``sink_size + window_size``."""
    num_committed: int = 0
    """Tokens committed since the rollout started (grows without bound)."""
    has_padding: bool = False
    """Whether a padding (invalid) key was ever staged; lets attention skip the mask."""


def storage_quantization(storage: torch.Tensor) -> str:
    """The quantisation mode whose storage dtype ``storage`` has."""
    return next(name for name, (dtype, _) in _STORAGE.items() if dtype == storage.dtype)


class KVCache:
    """Preallocated sink + rolling-window cache of one attention layer."""

    def __init__(
        self,
        *,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        chunk_size: int,
        window_size: int,
        sink_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        quantization: str = "none",
    ) -> None:
        if quantization not in KV_CACHE_QUANTIZATIONS:
            raise ValueError(
                f"KV cache quantization must be one of {', '.join(KV_CACHE_QUANTIZATIONS)}; "
                f"got {quantization!r}"
            )
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if window_size < 0 or sink_size < 0:
            raise ValueError(
                f"window_size and sink_size must be >= 0, got window_size={window_size}, "
                f"sink_size={sink_size}"
            )
        self.chunk_size = chunk_size
        self.window_size = window_size
        self.sink_size = sink_size
        self.quantization = quantization
        capacity = sink_size + window_size + chunk_size
        shape = (batch_size, capacity, num_heads, head_dim)
        storage_dtype = dtype if quantization == "none" else _STORAGE[quantization][0]
        self.k = torch.zeros(shape, device=device, dtype=storage_dtype)
        self.v = torch.zeros_like(self.k)
        # Per token and head scales of quantised storage; None in the compute dtype.
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if quantization != "none":
            self.k_scale = torch.ones(shape[:-1] + (1,), device=device, dtype=_SCALE_DTYPE)
            self.v_scale = torch.ones_like(self.k_scale)
        self.valid = torch.ones(capacity, dtype=torch.bool, device=device)
        self.counters = KVCacheCounters()

    # ------------------------------------------------------------------ views
    @classmethod
    def _view(cls, source: KVCache, start: int, stop: int) -> KVCache:
        """A cache over batch rows ``[start:stop]`` of ``source``; storage and counters shared."""
        rows = slice(start, stop)
        view = cls.__new__(cls)
        view.chunk_size = source.chunk_size
        view.window_size = source.window_size
        view.sink_size = source.sink_size
        view.quantization = source.quantization
        view.k, view.v, view.valid = source.k[rows], source.v[rows], source.valid
        view.k_scale = view.v_scale = None
        if source.k_scale is not None:
            view.k_scale, view.v_scale = source.k_scale[rows], source.v_scale[rows]
        view.counters = source.counters
        return view

    def batch_slice(self, start: int, stop: int) -> KVCache:
        """A cache viewing batch rows ``[start:stop]``; storage and counters are shared."""
        return KVCache._view(self, start, stop)

    # ------------------------------------------------- batching separate rollouts
    def can_batch_with(self, other: KVCache) -> bool:
        """Whether ``other`` is at the same point of a same-shaped rollout (sizes, storage,
        fill and key validity), so the two can run as one batch (:meth:`concat`)."""
        same = (
            type(self) is type(other)
            and self.k.shape[1:] == other.k.shape[1:]
            and self.k.dtype == other.k.dtype
            and (self.chunk_size, self.window_size, self.sink_size)
            == (other.chunk_size, other.window_size, other.sink_size)
            and self.counters.num_filled == other.counters.num_filled
            and self.counters.has_padding == other.counters.has_padding
        )
        if not same or not self.counters.has_padding:
            return same
        return torch.equal(self.valid, other.valid)

    @classmethod
    def concat(cls, caches: Sequence[KVCache]) -> KVCache:
        """One cache holding the batch rows of ``caches`` in order (new storage; its own
        bookkeeping, copied from the first). The caches must :meth:`can_batch_with` each other."""
        first = caches[0]
        assert all(first.can_batch_with(other) for other in caches[1:])
        buffers = zip(*(cache._token_buffers() for cache in caches), strict=True)
        return first._with_buffers([torch.cat(parts, dim=0) for parts in buffers])

    def split_rows(self, ranges: Sequence[tuple[int, int]]) -> list[KVCache]:
        """Caches over batch rows ``[start:stop]`` of each range: views of this storage
        (rows written later stay apart), each with its own copy of the bookkeeping."""
        return [
            self._with_buffers([buffer[start:stop] for buffer in self._token_buffers()])
            for start, stop in ranges
        ]

    def _with_buffers(self, buffers: list[torch.Tensor]) -> KVCache:
        """A copy of this cache over ``buffers`` (see :meth:`_token_buffers`) with its own
        validity mask and counters."""
        part = copy.copy(self)
        part.k, part.v = buffers[0], buffers[1]
        if len(buffers) > 2:
            part.k_scale, part.v_scale = buffers[2], buffers[3]
        part.valid = self.valid.clone()
        part.counters = dataclasses.replace(self.counters)
        return part

    @property
    def capacity(self) -> int:
        """Committed tokens the cache can hold: ``sink_size + window_size``."""
        return self.sink_size + self.window_size

    @property
    def num_filled(self) -> int:
        return self.counters.num_filled

    @property
    def is_full(self) -> bool:
        """Whether the window is full (steady state: shapes no longer change)."""
        return self.counters.num_filled == self.capacity

    def _token_buffers(self) -> list[torch.Tensor]:
        """Buffers indexed ``[B, token, ...]``: K, V and, when quantised, their scales."""
        buffers = [self.k, self.v]
        if self.k_scale is not None:
            buffers += [self.k_scale, self.v_scale]
        return buffers

    def storage_bytes(self) -> int:
        """Bytes held by the K/V/valid buffers (and the scales of quantised storage)."""
        buffers = [*self._token_buffers(), self.valid]
        return sum(t.numel() * t.element_size() for t in buffers)

    # ---------------------------------------------------------------- updates
    def stage(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        key_valid_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write the current chunk after the committed tokens; return the keys to attend to.

        Args:
            k, v: current chunk ``[B, n, H, D]`` with ``n <= chunk_size``.
            key_valid_mask: ``[n]`` bool (True = real token) or ``None``.

        Returns:
            ``(k_all, v_all, valid_all)`` views ``[B, num_filled + n, H, D]`` and
            ``[num_filled + n]``: committed tokens in write order, then the chunk.
            ``valid_all`` is ``None`` while no padding key was ever staged.
        """
        num_new = k.shape[1]
        assert num_new <= self.chunk_size, (num_new, self.chunk_size)
        start = self.counters.num_filled
        stop = start + num_new
        if self.k_scale is None:
            self.k[:, start:stop].copy_(k)
            self.v[:, start:stop].copy_(v)
            k_all, v_all = self.k[:, :stop], self.v[:, :stop]
        else:
            k_all = self._stage_quantized(k, start, self.k, self.k_scale)
            v_all = self._stage_quantized(v, start, self.v, self.v_scale)
        if key_valid_mask is None:
            self.valid[start:stop] = True
        else:
            self.valid[start:stop].copy_(key_valid_mask)
            self.counters.has_padding = True
        valid_all = self.valid[:stop] if self.counters.has_padding else None
        return k_all, v_all, valid_all

    @staticmethod
    def _stage_quantized(
        x: torch.Tensor, start: int, storage: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """Store the chunk ``x [B, n, H, D]`` quantised at ``start``; return committed + chunk.

        The committed tokens are dequantised to ``x.dtype``; the chunk is returned as given.
        """
        stop = start + x.shape[1]
        quantized, chunk_scale = quantize_per_token_head(x, storage_quantization(storage))
        storage[:, start:stop].copy_(quantized)
        scale[:, start:stop].copy_(chunk_scale)
        out = torch.empty((x.shape[0], stop, *x.shape[2:]), dtype=x.dtype, device=x.device)
        out[:, :start] = dequantize(storage[:, :start], scale[:, :start], x.dtype)
        out[:, start:] = x
        return out

    def commit(self, num_new: int) -> None:
        """Keep the chunk staged by the last :meth:`stage` call; evict from the window if full.

        The eviction is an in-place left shift of the window region, so the
        storage stays the same tensors at the same addresses.
        """
        total = self.counters.num_filled + num_new
        overflow = total - self.capacity
        if overflow > 0:
            sink = self.sink_size
            # Shift [sink + overflow, total) to [sink, total - overflow); clone: regions overlap.
            for buffer in self._token_buffers():
                buffer[:, sink : total - overflow] = buffer[:, sink + overflow : total].clone()
            self.valid[sink : total - overflow] = self.valid[sink + overflow : total].clone()
            total = self.capacity
        self.counters.num_filled = total
        self.counters.num_committed += num_new

    def reset(self) -> None:
        """Forget every committed token (the storage is kept)."""
        self.counters.num_filled = 0
        self.counters.num_committed = 0
        self.counters.has_padding = False
