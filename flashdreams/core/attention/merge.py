"""Merge partial attention results by log-sum-exp, in fp32.

If ``out_i, lse_i`` is softmax attention of the same queries over disjoint
key sets ``K_i``, attention over their union is::

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

Shapes: ``out [B, Lq, H, D]``, ``lse [B, H, Lq]``. A partial with
``lse = -inf`` (no valid key) contributes nothing; if every partial is empty
the merged row stays ``out = 0, lse = -inf``.
"""

from __future__ import annotations

import torch


def _weight(lse_part: torch.Tensor, lse_total: torch.Tensor) -> torch.Tensor:
    """``exp(lse_part - lse_total)`` as ``[B, Lq, H, 1]``, 0 where both are -inf."""
    weight = torch.exp(lse_part - lse_total)
    weight = torch.nan_to_num(weight, nan=0.0)
    return weight.transpose(1, 2).unsqueeze(-1)


def merge_attention_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partials; returns ``(out fp32, lse fp32)``."""
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.float() * _weight(lse_a, lse) + out_b.float() * _weight(lse_b, lse)
    return out, lse


class AttentionAccumulator:
    """Running fp32 merge of partial results, for ring attention.

    ``add(out, lse)`` folds in one partial; ``result(dtype)`` returns the
    merged output cast to ``dtype``.
    """

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out.float(), lse.float()
        else:
            self.out, self.lse = merge_attention_partials(self.out, self.lse, out, lse)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        assert self.out is not None, "no partial attention result was added"
        return self.out.to(dtype)
