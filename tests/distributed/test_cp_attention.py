"""Ring, Ulysses and USP attention on spawned gloo ranks equal one-process attention.

One spawned function per world size runs all checks, to pay the spawn cost once.
Every rank builds the same seeded global tensors, takes its shard with
``split_tokens`` and compares its output rows to single-process SDPA: the ring
primitive on its own (masks, unequal shards), and the one context-parallel
self-attention the networks use (:class:`ContextParallelSelfAttention`: ring,
Ulysses and USP over a streaming sink + window KV cache) against the
single-process :func:`attend` over a :class:`KVCache`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashdreams.core.attention import KVCache, attend
from flashdreams.core.attention.context_parallel import ContextParallelSelfAttention
from flashdreams.core.attention.ring import ring_attention
from flashdreams.core.attention.ulysses import ulysses_head_to_seq, ulysses_seq_to_head
from flashdreams.core.distributed import (
    CommStats,
    ParallelDims,
    all_gather_tokens,
    build_cp_mesh,
    gather_tokens,
    split_tokens,
    token_valid_mask,
)
from flashdreams.testing import run_on_ranks

TOL = 1e-5


def reference_attention(q, k, v):
    """Single-process SDPA over the full sequence, [B, L, H, D] layout."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)


def make_qkv(num_q, num_kv, num_heads=4, head_dim=8, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_q, num_heads, head_dim, generator=gen)
    k = torch.randn(batch, num_kv, num_heads, head_dim, generator=gen)
    v = torch.randn(batch, num_kv, num_heads, head_dim, generator=gen)
    return q, k, v


def shard(x, rank, world_size):
    return split_tokens(x, 1, rank, world_size)


def check_close(name, got, want):
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= TOL, f"{name}: max abs error {err:.3e} > {TOL}"


def cp_case(attn_fn, rank, world_size, num_q, num_kv, seed, name):
    """Sharded queries and keys (both padded to ceil(L/N) and masked)."""
    q, k, v = make_qkv(num_q, num_kv, seed=seed)
    want = reference_attention(q, k, v)
    q_local = shard(q, rank, world_size)
    kv_mask = token_valid_mask(num_kv, rank, world_size)[None].expand(q.shape[0], -1)
    out_local = attn_fn(q_local, shard(k, rank, world_size), shard(v, rank, world_size), kv_mask)
    # Compare the valid rows of this rank, and the all-gathered result.
    num_valid = int(token_valid_mask(num_q, rank, world_size).sum())
    check_close(
        f"{name} rank {rank}",
        out_local[:, :num_valid],
        shard(want, rank, world_size)[:, :num_valid],
    )
    return out_local


def unequal_shards_case(attn_fn, rank, world_size, name, masked):
    """K/V shards of different lengths per rank (e.g. cache parts of different size)."""
    kv_lens = [3 + 2 * r for r in range(world_size)]
    q, k, v = make_qkv(5 * world_size, sum(kv_lens), seed=7)
    want = reference_attention(q, k, v)
    start = sum(kv_lens[:rank])
    k_local = k[:, start : start + kv_lens[rank]]
    v_local = v[:, start : start + kv_lens[rank]]
    mask = torch.ones(k_local.shape[:2], dtype=torch.bool) if masked else None
    out_local = attn_fn(shard(q, rank, world_size), k_local, v_local, mask)
    check_close(f"{name} unequal rank {rank}", out_local, shard(want, rank, world_size))


def cache_plus_current_case(attn_fn, rank, world_size, name):
    """Keys = this rank's part of a (sink + window) cache followed by its chunk shard."""
    num_cache, num_chunk = 13, 10
    q, k_chunk, v_chunk = make_qkv(num_chunk, num_chunk, seed=3)
    _, k_cache, v_cache = make_qkv(1, num_cache, seed=4)
    want = reference_attention(
        q, torch.cat([k_cache, k_chunk], 1), torch.cat([v_cache, v_chunk], 1)
    )
    b = q.shape[0]
    k_local = torch.cat([shard(k_cache, rank, world_size), shard(k_chunk, rank, world_size)], 1)
    v_local = torch.cat([shard(v_cache, rank, world_size), shard(v_chunk, rank, world_size)], 1)
    mask = torch.cat(
        [
            token_valid_mask(num_cache, rank, world_size),
            token_valid_mask(num_chunk, rank, world_size),
        ]
    )[None].expand(b, -1)
    out_local = attn_fn(shard(q, rank, world_size), k_local, v_local, mask)
    num_valid = int(token_valid_mask(num_chunk, rank, world_size).sum())
    check_close(
        f"{name} cache rank {rank}",
        out_local[:, :num_valid],
        shard(want, rank, world_size)[:, :num_valid],
    )


def streaming_case(mesh, rank, world_size, num_tokens, name, *, window=None, sink=None):
    """Three chunks through the CP self-attention with a sink + window cache (window and
    sink not multiples of the chunk by default) vs one process over a KVCache."""
    num_heads, head_dim, batch = 4, 8, 2
    window = num_tokens + 3 if window is None else window
    sink = 2 if sink is None else sink
    sizes = dict(batch_size=batch, num_heads=num_heads, head_dim=head_dim, chunk_size=num_tokens)
    strategy = ContextParallelSelfAttention(mesh)
    cp_cache = strategy.make_kv_cache(**sizes, window_size=window, sink_size=sink)
    reference_cache = KVCache(**sizes, window_size=window, sink_size=sink)
    num_valid = int(token_valid_mask(num_tokens, rank, world_size).sum())
    for chunk in range(3):
        q, k, v = make_qkv(num_tokens, num_tokens, num_heads, head_dim, batch, seed=20 + chunk)
        want = attend(q, k, v, kv_cache=reference_cache, commit=True)
        local = [shard(x, rank, world_size) for x in (q, k, v)]
        got = strategy.self_attention(*local, kv_cache=cp_cache, commit=True)
        check_close(
            f"{name} chunk {chunk} rank {rank}",
            got[:, :num_valid],
            shard(want, rank, world_size)[:, :num_valid],
        )


def ring_and_ulysses_checks(rank, world_size):
    mesh = build_cp_mesh(ParallelDims(world_size, ulysses_degree=1))
    group = mesh.ring_group

    def ring(q, k, v, m):
        return ring_attention(q, k, v, m, group)

    def ring_serial(q, k, v, m):
        return ring_attention(q, k, v, m, group, overlap=False)

    # Divisible and non-divisible token counts (padding masked).
    for num_tokens in (4 * world_size, 4 * world_size + 1, 4 * world_size - 1):
        out = cp_case(ring, rank, world_size, num_tokens, num_tokens, 1, f"ring L={num_tokens}")
        serial = cp_case(ring_serial, rank, world_size, num_tokens, num_tokens, 1, "ring serial")
        assert torch.equal(out, serial), "overlapped and serial ring must be bit-identical"
        streaming_case(mesh, rank, world_size, num_tokens, f"ring streaming L={num_tokens}")
        if 4 % world_size == 0:
            ulysses_mesh = build_cp_mesh(ParallelDims(world_size, ulysses_degree=world_size))
            name = f"ulysses streaming L={num_tokens}"
            streaming_case(ulysses_mesh, rank, world_size, num_tokens, name)
    # K/V longer than Q: cache + current chunk.
    cache_plus_current_case(ring, rank, world_size, "ring")
    unequal_shards_case(ring, rank, world_size, "ring", masked=True)
    unequal_shards_case(ring, rank, world_size, "ring", masked=False)

    # Ring byte count: (N-1) shards of K+V (+ the mask) and one length all-gather.
    q, k, v = make_qkv(8 * world_size, 8 * world_size, seed=5)
    stats = CommStats()
    ring_attention(
        shard(q, rank, world_size),
        shard(k, rank, world_size),
        shard(v, rank, world_size),
        None,
        group,
        comm_stats=stats,
    )
    shard_bytes = 2 * shard(k, rank, world_size).numel() * 4
    assert stats.bytes_sent["ring_kv"] == (world_size - 1) * shard_bytes
    assert "ring_mask" not in stats.bytes_sent

    # Split / gather round trip with padding, gather on rank 0 only.
    x = torch.arange(2 * 11 * 3, dtype=torch.float32).reshape(2, 11, 3)
    local = split_tokens(x, 1, rank, world_size)
    gathered = gather_tokens(local, 1, 11, group, dst=0)
    if rank == 0:
        assert torch.equal(gathered, x)
    else:
        assert gathered is None
    assert torch.equal(all_gather_tokens(local, 1, 11, group), x)

    # The Ulysses head error on a head count the group size does not divide.
    if world_size in (3, 4):
        bad = torch.zeros(1, 2, 2 * world_size - 2, 4)
        with pytest.raises(ValueError) as info:
            ulysses_seq_to_head(bad, group)
        num_heads = 2 * world_size - 2
        choices = ", ".join(str(d) for d in range(1, num_heads + 1) if num_heads % d == 0)
        assert str(info.value) == (
            f"{num_heads} heads: Ulysses degree must be one of {choices}; got {world_size}"
        )
    # seq -> head -> seq is the identity.
    if 4 % world_size == 0:
        x = torch.randn(2, 3, 4, 5)
        heads = ulysses_seq_to_head(x, group)
        assert heads.shape == (2, 3 * world_size, 4 // world_size, 5)
        assert torch.equal(ulysses_head_to_seq(heads, group), x)


def usp_checks(rank, world_size):
    dims = ParallelDims(world_size, ulysses_degree=2, ring_degree=world_size // 2, num_heads=4)
    mesh = build_cp_mesh(dims)
    assert mesh.ulysses_rank == rank % 2 and mesh.ring_rank == rank // 2

    for num_tokens in (8, 9, 11):
        streaming_case(mesh, rank, world_size, num_tokens, f"usp streaming L={num_tokens}")
    streaming_case(mesh, rank, world_size, 9, "usp no sink, whole-chunk window", window=9, sink=0)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_and_ulysses_match_single_process(world_size):
    run_on_ranks(ring_and_ulysses_checks, world_size)


def test_usp_2x2_matches_single_process():
    run_on_ranks(usp_checks, 4)
