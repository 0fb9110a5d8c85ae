"""Ordered regex key remapping for state dicts."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch


def remap_checkpoint_keys(
    state_dict: Mapping[str, torch.Tensor],
    patterns: Iterable[tuple[str, str]],
) -> dict[str, torch.Tensor]:
    """Rename keys with ``(regex, replacement)`` pairs applied in order.

    Every pattern is tried on every key, in the given order, each working on
    the result of the previous one (``re.sub`` semantics, so ``\\1`` groups
    work). Keys no pattern touches pass through unchanged. Tensors are not
    copied. Two source keys mapping to the same name is an error.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in patterns]
    remapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in state_dict.items():
        new_key = key
        for pattern, replacement in compiled:
            new_key = pattern.sub(replacement, new_key)
        if new_key in remapped:
            raise KeyError(
                f"remap_checkpoint_keys: '{key}' and '{origin[new_key]}' both map to '{new_key}'"
            )
        remapped[new_key] = tensor
        origin[new_key] = key
    return remapped
