"""Single-process attention used when no context-parallel group is set.

Layout (the Wan network's)::

    q    [B, Lq, H, D]
    k, v [B, Lk, H, D]
    key_valid_mask  [B, Lk] bool, True = attend to this key (or None)
    attention_mask  [Lq, Lk] bool, True = query may attend to key (or None)
    out  [B, Lq, H, D]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention with torch SDPA (scale ``1/sqrt(D)``).

    Query rows that end up with no allowed key return zeros instead of NaN.
    """
    mask = None
    if key_valid_mask is not None:
        # [B, Lk] -> [B, 1, 1, Lk]
        mask = key_valid_mask[:, None, None, :]
    if attention_mask is not None:
        # [Lq, Lk] -> [1, 1, Lq, Lk]
        pair_mask = attention_mask[None, None]
        mask = pair_mask if mask is None else mask & pair_mask
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    if mask is not None:
        # [B or 1, 1, Lq or 1, Lk] -> [B or 1, Lq or 1, 1, 1]
        has_key = mask.any(dim=-1).transpose(1, 2)[..., None]
        out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.contiguous()
