"""Find which known key layout a state dict is in, also when it sits inside a training checkpoint.

A *layout* is named by a marker key that only that layout has (for the Wan DiT:
``blocks.0.self_attn.q.weight`` in the original Wan keys, ``blocks.0.attn1.to_q.weight``
in diffusers'). Training checkpoints nest model weights under a prefix
(``generator_ema.model.``, ``generator.model.``, ``critic.model.``, ...);
:func:`find_layout` finds the marker under any prefix and picks the weights
inference should use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

TRAINING_CHECKPOINT_PREFERENCE = ("generator_ema.", "generator.", "ema.", "model.")
"""Sub-state-dicts picked from a training checkpoint, best first: the EMA generator (what
Self-Forcing / CausVid inference uses), the generator, then a lone EMA or model entry."""

_MAX_SHOWN_KEYS = 5


@dataclass(frozen=True)
class FoundLayout:
    """Where a state dict's weights are and which layout they are in."""

    layout: str
    """Name of the layout whose marker key was found."""
    prefix: str
    """Key prefix of the chosen weights (``""`` for a plain state dict)."""
    candidates: tuple[str, ...]
    """Every prefix the marker was found under (several in a training checkpoint)."""

    @property
    def is_nested(self) -> bool:
        return self.prefix != ""


def _prefixes_of(keys: list[str], marker: str) -> list[str]:
    """Prefixes ``p`` (``""`` or ending in ``"."``) with ``p + marker`` in ``keys``."""
    found = []
    for key in keys:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            if prefix == "" or prefix.endswith("."):
                found.append(prefix)
    return found


def _preferred(prefixes: list[str]) -> str | None:
    if "" in prefixes:
        return ""
    for head in TRAINING_CHECKPOINT_PREFERENCE:
        matching = sorted(p for p in prefixes if p.startswith(head))
        if matching:
            return matching[0]
    return prefixes[0] if len(prefixes) == 1 else None


def find_layout(
    state_dict: Mapping[str, torch.Tensor],
    markers: Mapping[str, str],
    *,
    what: str,
    source: str,
) -> FoundLayout:
    """Detect the layout of ``state_dict`` from ``markers`` (layout name -> marker key).

    Raises ``ValueError`` with one line when no marker is found (naming the
    layouts looked for and the first keys of the file) or when a training
    checkpoint holds several sub-state-dicts and none is preferred
    (:data:`TRAINING_CHECKPOINT_PREFERENCE`).
    """
    keys = list(state_dict)
    for layout, marker in markers.items():
        prefixes = _prefixes_of(keys, marker)
        if not prefixes:
            continue
        chosen = _preferred(prefixes)
        if chosen is None:
            raise ValueError(
                f"{source} is a training checkpoint holding several {what} state dicts "
                f"({', '.join(repr(p) for p in sorted(prefixes))}) and none of them is a "
                f"generator: set state_dict_transform to pick one"
            )
        return FoundLayout(layout=layout, prefix=chosen, candidates=tuple(sorted(prefixes)))
    looked_for = ", ".join(f"{name} (e.g. '{marker}')" for name, marker in markers.items())
    shown = ", ".join(f"'{k}'" for k in keys[:_MAX_SHOWN_KEYS]) or "none"
    raise ValueError(
        f"{source} is not a {what} checkpoint in a known layout: looked for {looked_for}, "
        f"also nested in a training checkpoint; its first keys are {shown}. Set "
        f"state_dict_transform to a function that renames its keys"
    )


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed (all of them for ``""``)."""
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
