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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCacheCounters:
    """Python-side bookkeeping, shared between a cache and its batch slices."""

    num_filled: int = 0
    """Committed tokens held (sink + window part), at most ``sink_size + window_size``."""
    num_committed: int = 0
    """Tokens committed since the rollout started (grows without bound)."""
    has_padding: bool = False
    """Whether a padding (invalid) key was ever staged; lets attention skip the mask."""


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
    ) -> None:
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
        capacity = sink_size + window_size + chunk_size
        self.k = torch.zeros(batch_size, capacity, num_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.ones(capacity, dtype=torch.bool, device=device)
        self.counters = KVCacheCounters()

    # ------------------------------------------------------------------ views
    @classmethod
    def _view(
        cls, source: KVCache, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
    ) -> KVCache:
        view = cls.__new__(cls)
        view.chunk_size = source.chunk_size
        view.window_size = source.window_size
        view.sink_size = source.sink_size
        view.k, view.v, view.valid = k, v, valid
        view.counters = source.counters
        return view

    def batch_slice(self, start: int, stop: int) -> KVCache:
        """A cache viewing batch rows ``[start:stop]``; storage and counters are shared."""
        return KVCache._view(self, self.k[start:stop], self.v[start:stop], self.valid)

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

    def storage_bytes(self) -> int:
        """Bytes held by the K/V/valid buffers."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid))

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
        self.k[:, start:stop].copy_(k)
        self.v[:, start:stop].copy_(v)
        if key_valid_mask is None:
            self.valid[start:stop] = True
        else:
            self.valid[start:stop].copy_(key_valid_mask)
            self.counters.has_padding = True
        valid_all = self.valid[:stop] if self.counters.has_padding else None
        return self.k[:, :stop], self.v[:, :stop], valid_all

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
            for buffer in (self.k, self.v):
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
