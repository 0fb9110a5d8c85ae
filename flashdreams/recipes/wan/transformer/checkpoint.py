"""Key layouts of Wan DiT checkpoints.

:class:`~flashdreams.recipes.wan.transformer.impl.network.WanDiTNetwork` uses the
original Wan key names (``Wan2.1`` repo, Self-Forcing, CausVid), so those load
as they are. Diffusers ``WanTransformer3DModel`` checkpoints load through
:func:`wan_diffusers_state_dict_transform`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

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
