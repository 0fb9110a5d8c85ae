"""USP (unified sequence parallelism): Ulysses inside, ring across.

With ``ulysses_degree = U`` and ``ring_degree = R`` (see
:mod:`flashdreams.core.distributed.mesh`), the ``U`` contiguous ranks of a
Ulysses group exchange heads by all-to-all, so each holds its ``H/U`` heads for
the group's contiguous block of tokens; ring attention then rotates those
blocks across the ``R`` groups. This serves world sizes where the head count
does not divide by the world size (e.g. 12 heads on 8 ranks: 4 x 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from flashdreams.core.attention.backends import attention
from flashdreams.core.attention.ring import ring_attention
from flashdreams.core.attention.ulysses import ulysses_wrap
from flashdreams.core.distributed.comm_stats import CommStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid_mask: torch.Tensor | None = None,
    ulysses_group: ProcessGroup | None = None,
    ring_group: ProcessGroup | None = None,
    *,
    overlap: bool = True,
    backend: str = "auto",
    comm_stats: CommStats | None = None,
) -> torch.Tensor:
    """Attention over all CP ranks' keys with Ulysses x ring.

    Shapes as in :func:`flashdreams.core.attention.ring.ring_attention`. Either
    group may be ``None`` (degree 1): then this is pure ring, pure Ulysses, or
    local attention.
    """

    def inner(q_h, k_h, v_h, mask_h):
        return ring_attention(
            q_h,
            k_h,
            v_h,
            mask_h,
            ring_group,
            overlap=overlap,
            backend=backend,
            comm_stats=comm_stats,
        )

    if ulysses_group is None:
        return inner(q, k, v, key_valid_mask)
    if ring_group is None:
        return ulysses_wrap(
            q,
            k,
            v,
            key_valid_mask,
            ulysses_group,
            lambda q_h, k_h, v_h, m: attention(q_h, k_h, v_h, m, backend=backend),
            comm_stats,
        )
    return ulysses_wrap(q, k, v, key_valid_mask, ulysses_group, inner, comm_stats, always_mask=True)
