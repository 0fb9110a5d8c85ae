"""Attention for the video DiTs: one entry point for local, cross and context-parallel attention.

Every attention call of a network goes through :func:`attend`. For
self-attention it owns the KV-cache read / write, the key-validity mask, the
optional cache-relative RoPE and the choice between local attention and the
context-parallel strategy, so blocks never deal with layouts; cross-attention
calls it without a cache. The kernel comes from the backend registry
(:mod:`flashdreams.core.attention.backends`), chosen by name: ``"auto"`` runs
local attention with torch SDPA (which picks its own fused kernel) and lets
ring attention pick the fastest backend that returns the log-sum-exp.

Layout::

    q, k, v  [B, L, H, D]   B batch, L tokens of the current chunk on this rank,
                            H heads, D head dim
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flashdreams.core.attention.backends import attention, sdpa_attention
from flashdreams.core.attention.kv_cache import KVCache, KVCacheCounters

if TYPE_CHECKING:
    from flashdreams.core.attention.context_parallel import ContextParallelSelfAttention

__all__ = [
    "KVCache",
    "KVCacheCounters",
    "RelativeRope",
    "attend",
]

RelativeRope = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``rope(x, start, stop)`` rotates ``x`` ``[B, stop - start, H, D]`` as the tokens
at positions ``[start, stop)`` of the attended sequence ``[cache | current]``."""


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    kv_cache: KVCache | None = None,
    commit: bool = False,
    context_parallel: ContextParallelSelfAttention | None = None,
    key_valid_mask: torch.Tensor | None = None,
    relative_rope: RelativeRope | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``[cached keys | k]`` (or over ``k`` alone without a cache).

    Args:
        q, k, v: ``[B, Lq, H, D]`` / ``[B, Lk, H, D]``. With absolute RoPE the caller
            has already rotated ``q`` and ``k``.
        backend: attention backend name (see ``list_attention_backends()``) or ``"auto"``.
        kv_cache: this layer's self-attention cache, or ``None``.
        commit: keep the chunk's K/V in the cache after attending (the
            context-noise pass); denoising steps attend without keeping.
        context_parallel: the CP strategy holding this rank's process groups;
            ``None`` attends locally. It owns the cache layout (Ulysses must
            exchange heads before the cache write), so it runs the whole step.
        key_valid_mask: ``[Lk]`` bool, False marks padding tokens of this chunk.
        relative_rope: when set, K/V are cached unrotated and RoPE is applied
            here to the concatenated keys, positions counted from the cache
            start (the query sits at the end of that sequence).
        attention_mask: ``[Lq, L_keys]`` bool (True = may attend), for
            full-sequence reference passes; local SDPA only.

    Returns:
        ``[B, Lq, H, D]``.
    """
    if context_parallel is not None:
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
    # [L_keys] -> [B, L_keys]
    batch_valid = None if valid_all is None else valid_all[None].expand(q.shape[0], -1)
    if attention_mask is not None:
        if backend not in ("auto", "sdpa"):
            raise ValueError(
                f"attention_mask needs the sdpa attention backend, got backend={backend!r}"
            )
        # [B, Lk] & [Lq, Lk] -> [B or 1, Lq, Lk]
        mask = (
            attention_mask[None] if batch_valid is None else batch_valid[:, None] & attention_mask
        )
        out = sdpa_attention(q, k_all, v_all, mask)
    else:
        out = attention(
            q, k_all, v_all, batch_valid, backend="sdpa" if backend == "auto" else backend
        )
    if kv_cache is not None and commit:
        kv_cache.commit(num_query)
    return out
