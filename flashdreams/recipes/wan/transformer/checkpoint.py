"""Key layouts of Wan DiT checkpoints.

:class:`~flashdreams.recipes.wan.transformer.impl.network.WanDiTNetwork` uses the
original Wan key names (``Wan2.1`` repo, Self-Forcing, CausVid), so those load
as they are. Diffusers ``WanTransformer3DModel`` checkpoints load through
:func:`wan_diffusers_state_dict_transform`. :func:`to_original_wan_dit_keys`
detects which of the two a file uses, also inside a training checkpoint
(Self-Forcing's ``{generator, critic, generator_ema}``), and converts it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from loguru import logger

from flashdreams.core.checkpoint.layout import find_layout, strip_prefix

WAN_DIFFUSERS_KEY_PATTERNS: list[tuple[str, str]] = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    # diffusers norm2 is the affine cross-attention norm, the original norm3
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.to_(q|k|v)\.", r".self_attn.\1."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.to_(q|k|v)\.", r".cross_attn.\1."),
    (r"\.attn2\.add_(k|v)_proj\.", r".cross_attn.\1_img."),
    (r"\.attn2\.norm_added_k\.", ".cross_attn.norm_k_img."),
    (r"\.attn2\.", ".cross_attn."),
]
"""``(regex, replacement)`` pairs, applied in order, from diffusers names to Wan names."""

_DIFFUSERS_IGNORED_SUFFIXES = ("norm_added_q.weight", "norm_added_q.bias")
"""Keys diffusers itself ignores when loading (unused parameters of some exports)."""


def wan_diffusers_state_dict_transform(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to the original Wan layout.

    The mapping is structural (no tensor is copied or reshaped). A state dict
    already in the Wan layout passes through unchanged, so the transform is
    safe to set for either kind of checkpoint.
    """
    from flashdreams.core.checkpoint import remap_checkpoint_keys

    kept = {k: v for k, v in state_dict.items() if not k.endswith(_DIFFUSERS_IGNORED_SUFFIXES)}
    return remap_checkpoint_keys(kept, WAN_DIFFUSERS_KEY_PATTERNS)


WAN_DIT_LAYOUT_MARKERS = {
    "original Wan keys": "blocks.0.self_attn.q.weight",
    "diffusers keys": "blocks.0.attn1.to_q.weight",
}
"""Layout name -> a key only that layout has."""


def to_original_wan_dit_keys(
    state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Bring a Wan DiT state dict in any known layout to the original Wan keys.

    Handles the original Wan keys (returned as they are), diffusers keys
    (renamed with :func:`wan_diffusers_state_dict_transform`) and either one
    nested in a training checkpoint (the EMA generator is taken, as upstream
    inference does). Anything else raises a one-line ``ValueError`` that
    names the layouts looked for.
    """
    found = find_layout(state_dict, WAN_DIT_LAYOUT_MARKERS, what="Wan DiT", source=source)
    weights = strip_prefix(state_dict, found.prefix)
    if found.is_nested:
        others = [p for p in found.candidates if p != found.prefix]
        logger.info(
            f"{source}: training checkpoint, loading its '{found.prefix}' weights"
            + (f" (it also holds {', '.join(repr(p) for p in others)})" if others else "")
        )
    if found.layout == "diffusers keys":
        logger.info(f"{source}: diffusers layout, renamed to the original Wan keys")
        weights = wan_diffusers_state_dict_transform(weights)
    return weights
