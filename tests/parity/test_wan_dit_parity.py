"""Parity of WanDiTNetwork with diffusers' WanTransformer3DModel (random weights, fp32).

Each case builds a tiny diffusers model, ``save_pretrained``s it, loads that
folder through flashdreams' checkpoint loader + the diffusers key remap into
WanDiTNetwork, and compares one full-sequence bidirectional forward.
Tolerance: max abs difference <= 1e-4 (fp32).
"""

from __future__ import annotations

import diffusers  # noqa: E402  (dev extra; parity needs the reference)
import pytest
import torch
from dit_forward import run_one_chunk

from flashdreams.core.checkpoint import load_checkpoint, load_state_dict_into_module
from flashdreams.recipes.wan.transformer import (
    WanDiTNetwork,
    WanDiTNetworkConfig,
    wan_diffusers_state_dict_transform,
)

ATOL = 1e-4

# name, diffusers kwargs, (frames, height, width), text tokens, image tokens
CASES = {
    "t2v": (
        dict(
            in_channels=16,
            out_channels=16,
            text_dim=24,
            num_attention_heads=2,
            attention_head_dim=16,
        ),
        (3, 4, 6),
        16,
        None,
    ),
    # diffusers takes the image tokens as all but the last 512 context tokens
    "i2v": (
        dict(
            in_channels=36,
            out_channels=16,
            text_dim=24,
            num_attention_heads=2,
            attention_head_dim=16,
            image_dim=20,
            added_kv_proj_dim=32,
        ),
        (2, 4, 4),
        512,
        5,
    ),
    "ti2v5b_shaped": (
        dict(
            in_channels=48,
            out_channels=48,
            text_dim=24,
            num_attention_heads=2,
            attention_head_dim=16,
        ),
        (2, 4, 4),
        16,
        None,
    ),
}


def _build_pair(case: str, tmp_path, *, fuse: bool):
    kwargs, grid, num_text, num_image = CASES[case]
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), freq_dim=32, ffn_dim=48, num_layers=2, **kwargs
    ).eval()
    # non-trivial norm / bias parameters (diffusers initialises some to ones / zeros)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    reference.save_pretrained(tmp_path / case)
    config = WanDiTNetworkConfig(
        patch_size=(1, 2, 2),
        text_len=num_text,
        in_dim=kwargs["in_channels"],
        out_dim=kwargs["out_channels"],
        dim=kwargs["num_attention_heads"] * kwargs["attention_head_dim"],
        ffn_dim=48,
        freq_dim=32,
        text_dim=kwargs["text_dim"],
        num_heads=kwargs["num_attention_heads"],
        num_layers=2,
        cross_attn_enable_img=num_image is not None,
        img_dim=kwargs.get("image_dim") or 1280,
    )
    network = WanDiTNetwork(config).eval()
    state_dict = wan_diffusers_state_dict_transform(load_checkpoint(tmp_path / case))
    load_state_dict_into_module(network, state_dict, strict=True, source="diffusers export")
    if fuse:
        network.update_parameters_after_loading_checkpoint()
    return reference, network, grid, num_text, num_image


def _inputs(network, grid, num_text, num_image, batch=2):
    config = network.config
    generator = torch.Generator().manual_seed(1)
    frames, height, width = grid
    latent = torch.randn(batch, frames, config.in_dim, height, width, generator=generator)
    text = torch.randn(batch, num_text, config.text_dim, generator=generator)
    image = None
    if num_image is not None:
        image = torch.randn(batch, num_image, config.img_dim, generator=generator)
    return latent, text, image


def _run_reference(reference, latent, timestep, text, image):
    # diffusers: [B, C, T, H, W]; ours: [B, T, C, H, W]. diffusers embeds the image
    # tokens, prepends them to the text and splits them off again (all but the last 512).
    out = reference(
        hidden_states=latent.transpose(1, 2),
        timestep=timestep,
        encoder_hidden_states=text,
        encoder_hidden_states_image=image,
        return_dict=False,
    )[0]
    return out.transpose(1, 2)


def _report(ours, ref):
    max_abs = (ours - ref).abs().max().item()
    rel = ((ours - ref).norm() / ref.norm()).item()
    print(f"max abs diff {max_abs:.3e}, relative L2 error {rel:.3e}")
    return max_abs, rel


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_full_sequence_forward_matches_diffusers(case, fuse, tmp_path):
    reference, network, grid, num_text, num_image = _build_pair(case, tmp_path, fuse=fuse)
    latent, text, image = _inputs(network, grid, num_text, num_image)
    timestep = torch.tensor([937.5, 12.25])
    ours = run_one_chunk(network, latent, timestep, text, image)
    ref = _run_reference(reference, latent, timestep, text, image)
    assert ours.shape == ref.shape
    max_abs, rel = _report(ours, ref)
    assert max_abs <= ATOL and rel < 1e-5


@pytest.mark.parametrize("case", ["t2v", "ti2v5b_shaped"])
@torch.no_grad()
def test_per_token_timesteps_match_diffusers(case, tmp_path):
    """diffusers' Wan 2.2 TI2V path: a 2-D timestep [B, L] gives per-token AdaLN."""
    reference, network, grid, num_text, num_image = _build_pair(case, tmp_path, fuse=True)
    latent, text, image = _inputs(network, grid, num_text, num_image)
    frames, height, width = grid
    num_tokens = frames * (height // 2) * (width // 2)
    generator = torch.Generator().manual_seed(5)
    timestep = torch.rand(2, num_tokens, generator=generator) * 1000
    timestep[:, : num_tokens // frames] = 0.0  # first frame clean, as in TI2V
    ours = run_one_chunk(network, latent, timestep, text, image)
    ref = _run_reference(reference, latent, timestep, text, image)
    max_abs, rel = _report(ours, ref)
    assert max_abs <= ATOL and rel < 1e-5
    # per-token timesteps are really used: a scalar timestep gives a different output
    scalar = run_one_chunk(network, latent, timestep[:, -1], text, image)
    assert (scalar - ours).abs().max() > 1e-3
