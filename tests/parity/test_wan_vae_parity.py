"""Wan VAE (2.1 layout) vs diffusers' AutoencoderKLWan: random weights, diffusers folder, fp32.

Tolerance: 1e-4 max abs for encode (normalised posterior mean) and decode.
"""

from __future__ import annotations

import pytest
import torch

from flashdreams.recipes.wan import (
    WanVAEDecoderConfig,
    WanVAEEncoderConfig,
    wan21_diffusers_vae_state_dict_transform,
)

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4
Z_DIM = 4
DIMS = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    torch.manual_seed(0)
    mean = torch.randn(Z_DIM).mul(0.3).tolist()
    std = torch.rand(Z_DIM).add(0.5).tolist()
    vae = diffusers.AutoencoderKLWan(z_dim=Z_DIM, latents_mean=mean, latents_std=std, **DIMS).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if "gamma" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return vae, folder, mean, std


def _ours(config_class, folder, mean, std):
    return config_class(
        checkpoint_path=str(folder),
        state_dict_transform=wan21_diffusers_vae_state_dict_transform,
        dtype=torch.float32,
        z_dim=Z_DIM,
        latent_mean=tuple(mean),
        latent_std=tuple(std),
        use_cuda_graph=False,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in DIMS.items()},
    ).setup()


def test_encode_matches_diffusers(diffusers_vae):
    reference, folder, mean, std = diffusers_vae
    encoder = _ours(WanVAEEncoderConfig, folder, mean, std)
    video = torch.rand(2, 9, 3, 32, 48) * 2 - 1  # [B, T, 3, H, W]
    with torch.no_grad():
        expected = reference.encode(video.transpose(1, 2)).latent_dist.mean
        expected = (expected - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(
            1, -1, 1, 1, 1
        )
        actual = encoder(video)
    assert actual.shape == (2, 3, Z_DIM, 4, 6)
    error = (actual - expected.transpose(1, 2)).abs().max().item()
    assert error <= TOLERANCE, f"encode max abs error {error:.3e}"


def test_decode_matches_diffusers(diffusers_vae):
    reference, folder, mean, std = diffusers_vae
    decoder = _ours(WanVAEDecoderConfig, folder, mean, std)
    latent = torch.randn(1, 3, Z_DIM, 4, 6)  # normalised, [B, Tl, z, h, w]
    with torch.no_grad():
        raw = latent.transpose(1, 2) * torch.tensor(std).view(1, -1, 1, 1, 1) + torch.tensor(
            mean
        ).view(1, -1, 1, 1, 1)
        expected = reference.decode(raw).sample.clamp(-1, 1).transpose(1, 2)
        actual = decoder(latent)
    assert actual.shape == expected.shape == (1, 9, 3, 32, 48)
    error = (actual - expected).abs().max().item()
    assert error <= TOLERANCE, f"decode max abs error {error:.3e}"
    assert expected.std() > 1e-3
