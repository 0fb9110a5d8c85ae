"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from token shards to head shards.

Each of the ``N`` ranks of ``group`` holds ``L`` tokens of every head. One
all-to-all turns that into all ``N*L`` tokens of ``H/N`` heads, attention runs
locally over the full sequence, and a second all-to-all turns the result back
into token shards. After the exchange each rank holds the full key sequence
for its heads, which is also what its KV cache stores.

Layout of the exchange (``N`` ranks, ``L`` local tokens, ``Hn = H / N``)::

    seq-sharded  [B, L, H, D]  -> [N, B, L, Hn, D]  (head group j goes to rank j)
    all-to-all                 -> [N, B, L, Hn, D]  (token block i came from rank i)
    head-sharded               -> [B, N*L, Hn, D]

The all-to-all is ``torch.distributed.all_to_all_single`` with equal splits
(gloo and NCCL both provide it); each rank sends ``(N-1)/N`` of its input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flashdreams.core.attention.backends import attention
from flashdreams.core.distributed.comm_stats import CommStats
from flashdreams.core.distributed.parallel_dims import divisors
from flashdreams.core.distributed.sharding import pad_tokens

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def check_ulysses_heads(num_heads: int, ulysses_degree: int) -> None:
    """``ValueError`` naming the valid degrees unless ``ulysses_degree`` divides the heads."""
    if num_heads % ulysses_degree != 0:
        choices = ", ".join(str(d) for d in divisors(num_heads))
        raise ValueError(
            f"{num_heads} heads: Ulysses degree must be one of {choices}; got {ulysses_degree}"
        )


def _all_to_all(x: torch.Tensor, group: ProcessGroup, comm_stats: CommStats | None) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 (size N)."""
    import torch.distributed as dist

    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    if comm_stats is not None:
        world_size = x.shape[0]
        comm_stats.add_tensor("ulysses_a2a", x, fraction=(world_size - 1) / world_size)
    return out


def ulysses_seq_to_head(
    x: torch.Tensor, group: ProcessGroup | None, comm_stats: CommStats | None = None
) -> torch.Tensor:
    """``[B, L, H, D]`` token shard -> ``[B, N*L, H/N, D]`` head shard (same L on all ranks)."""
    if group is None:
        return x
    import torch.distributed as dist

    world_size = dist.get_world_size(group)
    b, seq_len, num_heads, head_dim = x.shape
    check_ulysses_heads(num_heads, world_size)
    heads_per_rank = num_heads // world_size
    # [B, L, H, D] -> [N, B, L, Hn, D]
    x = x.reshape(b, seq_len, world_size, heads_per_rank, head_dim).permute(2, 0, 1, 3, 4)
    x = _all_to_all(x, group, comm_stats)
    # [N(source), B, L, Hn, D] -> [B, N*L, Hn, D]
    return x.permute(1, 0, 2, 3, 4).reshape(b, world_size * seq_len, heads_per_rank, head_dim)


def ulysses_head_to_seq(
    x: torch.Tensor, group: ProcessGroup | None, comm_stats: CommStats | None = None
) -> torch.Tensor:
    """``[B, N*L, H/N, D]`` head shard -> ``[B, L, H, D]`` token shard."""
    if group is None:
        return x
    import torch.distributed as dist

    world_size = dist.get_world_size(group)
    b, total_len, heads_per_rank, head_dim = x.shape
    if total_len % world_size != 0:
        raise ValueError(f"head-sharded length {total_len} is not a multiple of {world_size} ranks")
    seq_len = total_len // world_size
    # [B, N*L, Hn, D] -> [N, B, L, Hn, D]
    x = x.reshape(b, world_size, seq_len, heads_per_rank, head_dim).permute(1, 0, 2, 3, 4)
    x = _all_to_all(x, group, comm_stats)
    # [N(head group), B, L, Hn, D] -> [B, L, N*Hn, D]
    return x.permute(1, 2, 0, 3, 4).reshape(b, seq_len, world_size * heads_per_rank, head_dim)


InnerAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor
]


def ulysses_wrap(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid_mask: torch.Tensor | None,
    group: ProcessGroup,
    inner: InnerAttention,
    comm_stats: CommStats | None = None,
    lengths_known_equal: bool = False,
    always_mask: bool = False,
) -> torch.Tensor:
    """Run ``inner(q_h, k_h, v_h, mask_h)`` on head shards and return token shards.

    Token counts may differ by rank: they are exchanged (one tiny all-gather,
    skipped with ``lengths_known_equal=True``), shorter shards are padded,
    padded keys are masked and padded query rows are dropped from the output.
    ``always_mask=True`` hands ``inner`` a mask even when every key is valid
    (USP needs it: all ranks of a ring must agree on whether masks travel).
    """
    import torch.distributed as dist

    from flashdreams.core.attention.ring import all_gather_lengths

    world_size = dist.get_world_size(group)
    check_ulysses_heads(q.shape[2], world_size)
    q_len, kv_len = q.shape[1], k.shape[1]
    if lengths_known_equal:
        q_max, kv_max, kv_lens = q_len, kv_len, [kv_len] * world_size
    else:
        lengths = all_gather_lengths([q_len, kv_len], group, q.device, comm_stats)
        q_max, kv_max = int(lengths[:, 0].max()), int(lengths[:, 1].max())
        kv_lens = lengths[:, 1].tolist()

    q_heads = ulysses_seq_to_head(pad_tokens(q, 1, q_max), group, comm_stats)
    k_heads = ulysses_seq_to_head(pad_tokens(k, 1, kv_max), group, comm_stats)
    v_heads = ulysses_seq_to_head(pad_tokens(v, 1, kv_max), group, comm_stats)

    # Full-sequence key mask [B, N*kv_max] in rank order.
    if key_valid_mask is not None:
        local_mask = pad_tokens(key_valid_mask.to(torch.uint8), 1, kv_max).contiguous()
        gathered = [torch.empty_like(local_mask) for _ in range(world_size)]
        dist.all_gather(gathered, local_mask, group=group)
        if comm_stats is not None:
            comm_stats.add_tensor("ulysses_mask", local_mask, fraction=world_size - 1)
        mask_heads = torch.cat(gathered, dim=1).bool()
    elif always_mask or any(n != kv_max for n in kv_lens):
        positions = torch.arange(kv_max, device=k.device)
        mask_heads = torch.cat([positions < n for n in kv_lens])
        mask_heads = mask_heads[None].expand(k.shape[0], -1).contiguous()
    else:
        mask_heads = None

    out_heads = inner(q_heads, k_heads, v_heads, mask_heads)
    out = ulysses_head_to_seq(out_heads, group, comm_stats)
    return out[:, :q_len]


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid_mask: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    *,
    backend: str = "auto",
    comm_stats: CommStats | None = None,
    lengths_known_equal: bool = False,
) -> torch.Tensor:
    """Attention over the keys of all ranks in ``group`` via two all-to-all rounds.

    Shapes as in :func:`flashdreams.core.attention.ring.ring_attention`; the
    head count must divide by the group size (``ValueError`` lists the valid
    sizes). ``group=None`` computes locally. Pass ``key_valid_mask`` on every
    rank or on none.
    """
    if group is None:
        return attention(q, k, v, key_valid_mask, backend=backend)

    def local(q_h, k_h, v_h, mask_h):
        return attention(q_h, k_h, v_h, mask_h, backend=backend)

    return ulysses_wrap(
        q, k, v, key_valid_mask, group, local, comm_stats, lengths_known_equal=lengths_known_equal
    )
