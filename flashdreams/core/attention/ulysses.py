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

from typing import TYPE_CHECKING

import torch

from flashdreams.core.distributed.comm_stats import CommStats
from flashdreams.core.distributed.parallel_dims import divisors

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
