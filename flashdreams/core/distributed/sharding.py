"""Shard a token axis over CP ranks with padding, and gather it back.

Every rank gets the same number of slots, ``ceil(L / N)``; the sequence is
padded at the end to ``ceil(L / N) * N`` so the last rank(s) hold padding.
:func:`token_valid_mask` says which local slots are real tokens; attention
masks the padded keys so results equal the unsharded computation, and the
gathers strip the padding.

Legend: ``L`` global tokens, ``N`` ranks, ``S = ceil(L / N)`` slots per rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def slots_per_rank(num_tokens: int, world_size: int) -> int:
    """``S = ceil(num_tokens / world_size)``: local length on every rank."""
    return -(-num_tokens // world_size)


def local_token_count(num_tokens: int, rank: int, world_size: int) -> int:
    """Number of real (non-padding) tokens on ``rank``."""
    _check_rank(rank, world_size)
    slots = slots_per_rank(num_tokens, world_size)
    return max(0, min(slots, num_tokens - rank * slots))


def token_valid_mask(
    num_tokens: int, rank: int, world_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``[S]``: True for the slots of ``rank`` that hold real tokens."""
    slots = slots_per_rank(num_tokens, world_size)
    count = local_token_count(num_tokens, rank, world_size)
    return torch.arange(slots, device=device) < count


def pad_tokens(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` up to ``length`` (no copy if already that long)."""
    dim = dim % x.ndim
    current = x.shape[dim]
    if current == length:
        return x
    if current > length:
        raise ValueError(f"cannot pad dim {dim} of length {current} down to {length}")
    # F.pad lists (left, right) pairs starting from the last dim.
    pad = [0, 0] * (x.ndim - 1 - dim) + [0, length - current]
    return F.pad(x, pad)


def split_tokens(x: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's ``S`` slots of the token axis ``dim`` (padded with zeros)."""
    _check_rank(rank, world_size)
    dim = dim % x.ndim
    slots = slots_per_rank(x.shape[dim], world_size)
    padded = pad_tokens(x, dim, slots * world_size)
    return padded.narrow(dim, rank * slots, slots).contiguous()


def _strip(full_padded: torch.Tensor, dim: int, num_tokens: int) -> torch.Tensor:
    return full_padded.narrow(dim, 0, num_tokens).contiguous()


def gather_tokens(
    x_local: torch.Tensor,
    dim: int,
    num_tokens: int,
    group: ProcessGroup | None,
    dst: int = 0,
) -> torch.Tensor | None:
    """Gather the shards on group rank ``dst`` (a gather, not an all-gather).

    Returns the full ``num_tokens``-long tensor, padding stripped, on ``dst``
    and ``None`` on every other rank. With ``group=None`` (single process) it
    only strips the padding.
    """
    dim = dim % x_local.ndim
    if group is None:
        return _strip(x_local, dim, num_tokens)
    import torch.distributed as dist

    x_local = x_local.contiguous()
    world_size = dist.get_world_size(group)
    is_dst = dist.get_rank(group) == dst
    gather_list = [torch.empty_like(x_local) for _ in range(world_size)] if is_dst else None
    dist.gather(x_local, gather_list, group=group, group_dst=dst)
    if not is_dst:
        return None
    return _strip(torch.cat(gather_list, dim=dim), dim, num_tokens)


def all_gather_tokens(
    x_local: torch.Tensor, dim: int, num_tokens: int, group: ProcessGroup | None
) -> torch.Tensor:
    """Gather the shards on every rank of ``group``; padding stripped."""
    dim = dim % x_local.ndim
    if group is None:
        return _strip(x_local, dim, num_tokens)
    import torch.distributed as dist

    x_local = x_local.contiguous()
    world_size = dist.get_world_size(group)
    gather_list = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(gather_list, x_local, group=group)
    return _strip(torch.cat(gather_list, dim=dim), dim, num_tokens)
