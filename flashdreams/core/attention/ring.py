"""Ring attention: every rank keeps its queries, K/V shards travel round the ring.

Each of the ``N`` ranks of ``group`` holds its queries ``q`` and a K/V shard
(for streaming: its part of the sink + window cache followed by its shard of
the current chunk). In ``N`` steps every rank attends its queries to every
shard: step ``s`` computes against the shard that started on rank
``rank - s`` while ``batch_isend_irecv`` already moves the next one
(``overlap=True``). Partial outputs merge in fp32 by log-sum-exp.

Shards may differ in length between ranks: lengths are exchanged once per
call (one tiny all-gather, skipped when ``kv_len_max`` is given) and shards
are padded to the longest; the padding is never attended to.

Shapes: ``q [B, Lq, H, D]``, ``k, v [B, Lk_r, H, D]``, ``key_valid_mask
[B, Lk_r]`` bool (True = real key) or ``None`` on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from flashdreams.core.attention.backends import attention, attention_with_lse
from flashdreams.core.attention.merge import AttentionAccumulator
from flashdreams.core.distributed.comm_stats import CommStats
from flashdreams.core.distributed.sharding import pad_tokens

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def all_gather_lengths(
    lengths: list[int],
    group: ProcessGroup,
    device: torch.device,
    comm_stats: CommStats | None = None,
) -> torch.Tensor:
    """All-gather a few ints per rank; returns ``[N, len(lengths)]`` int64 on CPU."""
    import torch.distributed as dist

    local = torch.tensor(lengths, dtype=torch.int64, device=device)
    world_size = dist.get_world_size(group)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    if comm_stats is not None:
        comm_stats.add_tensor("lengths", local, fraction=world_size - 1)
    return torch.stack(gathered).cpu()


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid_mask: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    *,
    overlap: bool = True,
    kv_len_max: int | None = None,
    shard_lens: list[int] | None = None,
    backend: str = "auto",
    comm_stats: CommStats | None = None,
) -> torch.Tensor:
    """Attention of the local queries to the K/V shards of all ranks in ``group``.

    Args:
        q: local queries ``[B, Lq, H, D]``.
        k, v: local K/V shard ``[B, Lk_r, H, D]``; ``Lk_r`` may differ by rank.
        key_valid_mask: ``[B, Lk_r]`` bool, or ``None``; pass a mask on every
            rank or on none (masks travel with the shards).
        group: ring process group; ``None`` computes locally.
        overlap: keep the next shard in flight while computing the current one;
            ``False`` receives each shard before computing (for measurement).
        kv_len_max: common padded shard length if the caller knows it (skips
            the length all-gather); must be >= every rank's ``Lk_r``.
        shard_lens: every ring rank's ``Lk_r`` if the caller knows them (skips
            the length all-gather and the mask transfer); ``kv_len_max`` is then
            their maximum.
        backend: attention backend name or ``"auto"``; it must return the lse.
        comm_stats: optional byte counter.

    Returns:
        ``[B, Lq, H, D]`` in ``q.dtype``.
    """
    if group is None:
        return attention(q, k, v, key_valid_mask, backend=backend)
    import torch.distributed as dist

    world_size = dist.get_world_size(group)
    if world_size == 1:
        return attention(q, k, v, key_valid_mask, backend=backend)
    rank = dist.get_rank(group)
    next_rank = (rank + 1) % world_size
    prev_rank = (rank - 1) % world_size

    local_len = k.shape[1]
    if shard_lens is not None:
        if len(shard_lens) != world_size or shard_lens[rank] != local_len:
            raise ValueError(
                f"shard_lens {shard_lens} must list {world_size} lengths with this rank's "
                f"{local_len} at index {rank}"
            )
        shard_lens = list(shard_lens)
        kv_len_max = max(shard_lens)
    elif kv_len_max is None:
        shard_lens = all_gather_lengths([local_len], group, q.device, comm_stats)[:, 0].tolist()
        kv_len_max = max(shard_lens)
    else:
        if local_len > kv_len_max:
            raise ValueError(
                f"kv_len_max={kv_len_max} is shorter than this rank's {local_len} keys"
            )
        shard_lens = None  # unknown: every rank pads to kv_len_max, so send a mask
    # [2, B, Lmax, H, D]: K and V travel as one message.
    kv = torch.stack([pad_tokens(k, 1, kv_len_max), pad_tokens(v, 1, kv_len_max)])
    send_mask = key_valid_mask is not None or shard_lens is None
    if send_mask:
        mask = key_valid_mask
        if mask is None:
            mask = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
        # gloo has no bool transport on every build; uint8 is one byte either way.
        mask = pad_tokens(mask.to(torch.uint8), 1, kv_len_max).contiguous()

    kv_buffers = [kv, torch.empty_like(kv)]
    mask_buffers = [mask, torch.empty_like(mask)] if send_mask else None
    accumulator = AttentionAccumulator()
    for step in range(world_size):
        current = step % 2
        requests = []
        if step < world_size - 1:
            ops = [
                dist.P2POp(dist.isend, kv_buffers[current], group=group, group_peer=next_rank),
                dist.P2POp(dist.irecv, kv_buffers[1 - current], group=group, group_peer=prev_rank),
            ]
            if send_mask:
                ops += [
                    dist.P2POp(
                        dist.isend, mask_buffers[current], group=group, group_peer=next_rank
                    ),
                    dist.P2POp(
                        dist.irecv, mask_buffers[1 - current], group=group, group_peer=prev_rank
                    ),
                ]
            if comm_stats is not None:
                comm_stats.add_tensor("ring_kv", kv_buffers[current])
                if send_mask:
                    comm_stats.add_tensor("ring_mask", mask_buffers[current])
            requests = dist.batch_isend_irecv(ops)
            if not overlap:
                for request in requests:
                    request.wait()
                requests = []

        source = (rank - step) % world_size
        shard_k, shard_v = kv_buffers[current][0], kv_buffers[current][1]
        if send_mask:
            shard_mask = mask_buffers[current].bool()
        else:
            shard_len = shard_lens[source]
            shard_k, shard_v, shard_mask = shard_k[:, :shard_len], shard_v[:, :shard_len], None
        out, lse = attention_with_lse(q, shard_k, shard_v, shard_mask, backend=backend)
        accumulator.add(out, lse)

        for request in requests:
            request.wait()
    return accumulator.result(q.dtype)
