"""Gaussian draws for one rollout or for several rollouts batched into one forward.

A rollout draws its noise from one generator (or the global one). When the
chunks of several rollouts run as one batch, each rollout keeps its own
generator: the batch is drawn entry by entry, each entry from its own
generator in its own shape, so every rollout gets exactly the numbers it
would get alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NoiseSource = torch.Generator | Sequence[torch.Generator] | None
"""A generator, ``None`` (the global generator of the device), or one generator per
batched rollout (a list), in batch order."""


def num_noise_entries(rng: NoiseSource) -> int:
    """Rollouts drawn from ``rng``: the list's length, else 1."""
    if rng is None or isinstance(rng, torch.Generator):
        return 1
    return len(rng)


def entry_shape(shape: tuple[int, ...], rng: NoiseSource) -> tuple[int, ...]:
    """One rollout's part of a batch of ``shape`` whose leading dim stacks the rollouts."""
    num_entries = num_noise_entries(rng)
    if num_entries == 1:
        return tuple(shape)
    assert shape[0] % num_entries == 0, (tuple(shape), num_entries)
    return (shape[0] // num_entries, *shape[1:])


def randn_entries(
    shape: tuple[int, ...],
    rng: NoiseSource,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """Noise of one rollout's ``shape`` per entry of ``rng``, stacked along dim 0.

    With one generator (or ``None``) this is ``torch.randn(shape, generator=rng)``.
    With ``N`` generators each draws ``shape`` and the draws are concatenated along
    dim 0: ``[N * shape[0], *shape[1:]]`` (batched rollouts have one batch dim).
    """
    if rng is None or isinstance(rng, torch.Generator):
        return torch.randn(shape, generator=rng, device=device, dtype=dtype)
    if len(rng) == 1:
        return torch.randn(shape, generator=rng[0], device=device, dtype=dtype)
    return torch.cat(
        [torch.randn(shape, generator=entry, device=device, dtype=dtype) for entry in rng], dim=0
    )
