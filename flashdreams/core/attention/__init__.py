"""Attention for the video DiTs: one self-attention entry point and its KV cache.

Every self-attention call of a network goes through :func:`self_attention`.
It owns the KV-cache read / write, the key-validity mask, the optional
cache-relative RoPE and the choice between local attention and a
context-parallel implementation, so blocks never deal with layouts.

Layout::

    q, k, v  [B, L, H, D]   B batch, L tokens of the current chunk on this rank,
                            H heads, D head dim
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from flashdreams.core.attention.kv_cache import KVCache, KVCacheCounters
from flashdreams.core.attention.local import local_attention

__all__ = [
    "ContextParallelAttention",
    "KVCache",
    "KVCacheCounters",
    "RelativeRope",
    "local_attention",
    "self_attention",
]

RelativeRope = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``rope(x, start, stop)`` rotates ``x`` ``[B, stop - start, H, D]`` as the tokens
at positions ``[start, stop)`` of the attended sequence ``[cache | current]``."""


class ContextParallelAttention(Protocol):
    """What a context-parallel strategy (ring, Ulysses, USP) provides to the entry point."""

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_valid_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the local queries over the keys of every rank; ``[B, Lq, H, D]``."""
        ...


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_cache: KVCache | None = None,
    commit: bool = False,
    context_parallel: ContextParallelAttention | None = None,
    key_valid_mask: torch.Tensor | None = None,
    relative_rope: RelativeRope | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention of the current chunk over ``[cached tokens | current chunk]``.

    Args:
        q, k, v: current chunk ``[B, L, H, D]``. With absolute RoPE the caller
            has already rotated ``q`` and ``k``.
        kv_cache: this layer's cache, or ``None`` to attend to the chunk only.
        commit: keep the chunk's K/V in the cache after attending (the
            context-noise pass); denoising steps attend without keeping.
        context_parallel: strategy that spreads the keys over ranks; ``None``
            runs torch SDPA locally. A strategy with a ``self_attention`` method
            (:class:`~flashdreams.core.attention.context_parallel.ContextParallelSelfAttention`)
            takes over the cache read / write too; one with only ``attention``
            gets the locally staged keys.
        key_valid_mask: ``[L]`` bool, False marks padding tokens of this chunk.
        relative_rope: when set, K/V are cached unrotated and RoPE is applied
            here to the concatenated keys, positions counted from the cache
            start (the query sits at the end of that sequence).
        attention_mask: ``[L, L_keys]`` bool (True = may attend), for
            full-sequence reference passes; local attention only.

    Returns:
        ``[B, L, H, D]``.
    """
    if context_parallel is not None and hasattr(context_parallel, "self_attention"):
        # A strategy that owns the cache layout (ContextParallelSelfAttention): Ulysses must
        # exchange heads before the cache write, so it runs the whole step itself.
        if attention_mask is not None:
            raise ValueError("attention_mask is only supported without context parallelism")
        return context_parallel.self_attention(
            q, k, v, kv_cache=kv_cache, commit=commit, relative_rope=relative_rope
        )
    num_query = q.shape[1]
    if kv_cache is None:
        k_all, v_all = k, v
        valid_all = key_valid_mask
    else:
        k_all, v_all, valid_all = kv_cache.stage(k, v, key_valid_mask)
    if relative_rope is not None:
        num_keys = k_all.shape[1]
        k_all = relative_rope(k_all, 0, num_keys)
        q = relative_rope(q, num_keys - num_query, num_keys)
    batch_valid = None
    if valid_all is not None:
        # [L_keys] -> [B, L_keys]
        batch_valid = valid_all[None].expand(q.shape[0], -1)
    if context_parallel is None:
        out = local_attention(q, k_all, v_all, batch_valid, attention_mask)
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is only supported without context parallelism")
        out = context_parallel.attention(q, k_all, v_all, batch_valid)
    if kv_cache is not None and commit:
        kv_cache.commit(num_query)
    return out
