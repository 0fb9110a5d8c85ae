"""Checks a session runs on every chunk."""

from __future__ import annotations

from typing import Any


class NonFiniteOutputError(RuntimeError):
    """The generated latent (or decoded video) holds NaN or Inf."""


def check_finite(latent: Any, autoregressive_index: int) -> None:
    """Raise :class:`NonFiniteOutputError` naming the AR step when ``latent`` holds NaN or Inf."""
    import torch

    if latent is None or not torch.is_floating_point(latent):
        return
    finite = torch.isfinite(latent)
    if bool(finite.all()):
        return
    num_bad = int((~finite).sum())
    raise NonFiniteOutputError(
        f"AR step {autoregressive_index}: the generated latent holds {num_bad} NaN/Inf "
        f"value(s) out of {latent.numel()}; the chunk was not written. Check the weights, "
        "the dtype and the scheduler settings (runner.check_finite=false disables this check)"
    )
