"""One full-sequence bidirectional forward of a WanDiTNetwork, for comparisons with references."""

from __future__ import annotations

import torch

from flashdreams.recipes.wan.transformer.impl.rope import WanRope


def run_one_chunk(network, latent, timestep, text, image=None) -> torch.Tensor:
    """``latent [B, T, C, H, W]`` -> flow ``[B, T, C_out, H, W]``: one chunk, no window, no sink."""
    num_frames, _, height, width = latent.shape[1:]
    tokens = network.patchify_and_maybe_split_cp(latent)
    cache = network.initialize_cache(
        chunk_size=tokens.shape[1],
        window_size=0,
        sink_size=0,
        text_embeddings=text,
        img_embeddings=image,
    )
    rope = WanRope(
        head_dim=network.config.head_dim, num_height_tokens=height // 2, num_width_tokens=width // 2
    )
    out = network(tokens, timestep, cache, rope.chunk_freqs(0, num_frames))
    return network.unpatchify_and_maybe_gather_cp(height // 2, width // 2, out)
