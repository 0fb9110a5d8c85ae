"""Wan VAE vs diffusers' AutoencoderKLWan: random weights, loaded from a diffusers folder, fp32.

Two layouts: Wan 2.1 (plain stages, 8x spatial) and Wan 2.2 TI2V 5B (residual
stages, 2x2 pixel packing, 48 latent channels, asymmetric decoder width).
Each diffusers model is ``save_pretrained`` to a temporary folder and loaded
through the project's checkpoint loader + key remap. Tolerance: 1e-4 max abs.
"""

from __future__ import annotations

import diffusers  # noqa: E402  (dev extra; parity needs the reference)
import pytest
import torch

from flashdreams.recipes.wan.autoencoder import (
    Wan22TI2V5BVAEDecoderConfig,
    Wan22TI2V5BVAEEncoderConfig,
    WanVAEDecoderConfig,
    WanVAEEncoderConfig,
    wan21_diffusers_vae_state_dict_transform,
    wan22_ti2v_5b_vae_state_dict_transform,
)
from flashdreams.recipes.wan.autoencoder import vae as vae_module

TOLERANCE = 1e-4
TINY_DIMS = dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)

# layout -> (diffusers kwargs, our encoder / decoder config classes, our extra kwargs, frame side)
LAYOUTS = {
    "wan21": (
        dict(z_dim=4),
        WanVAEEncoderConfig,
        WanVAEDecoderConfig,
        dict(z_dim=4, state_dict_transform=wan21_diffusers_vae_state_dict_transform),
        (16, 24),
    ),
    "wan22_ti2v_5b": (
        dict(
            z_dim=48,
            decoder_base_dim=16,
            is_residual=True,
            patch_size=2,
            in_channels=12,
            out_channels=12,
            scale_factor_spatial=16,
        ),
        Wan22TI2V5BVAEEncoderConfig,
        Wan22TI2V5BVAEDecoderConfig,
        dict(),  # the preset already has z_dim 48, patch 2, residual and the 2.2 remap
        (32, 48),
    ),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    name = request.param
    diffusers_kwargs, encoder_class, decoder_class, our_kwargs, frame_size = LAYOUTS[name]
    torch.manual_seed(0)
    z_dim = diffusers_kwargs["z_dim"]
    mean = torch.randn(z_dim).mul(0.3).tolist()
    std = torch.rand(z_dim).add(0.5).tolist()
    reference = diffusers.AutoencoderKLWan(
        latents_mean=mean,
        latents_std=std,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_DIMS.items()},
        **diffusers_kwargs,
    ).eval()
    with torch.no_grad():  # move norms and biases off their defaults so they matter
        for param_name, param in reference.named_parameters():
            if param_name.endswith("gamma") or param_name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp(name)
    reference.save_pretrained(folder)
    common = dict(
        checkpoint_path=str(folder),
        dtype=torch.float32,
        use_cuda_graph=False,
        latent_mean=tuple(mean),
        latent_std=tuple(std),
        **TINY_DIMS,
        **our_kwargs,
    )
    decoder_extra = (
        {"decoder_base_dim": diffusers_kwargs["decoder_base_dim"]}
        if "decoder_base_dim" in diffusers_kwargs
        else {}
    )
    encoder = encoder_class(**common).setup().eval()
    decoder = decoder_class(**common, **decoder_extra).setup().eval()
    stats = (torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1))
    return name, reference, encoder, decoder, stats, frame_size


def _diffusers_encode(reference, video, stats):
    """``video [B, T, 3, H, W]`` -> diffusers' normalised posterior mean ``[B, Tl, z, h, w]``."""
    mean, std = stats
    mu = reference.encode(video.transpose(1, 2)).latent_dist.mean
    return ((mu - mean) / std).transpose(1, 2)


def _diffusers_decode(reference, latent, stats):
    """Normalised ``latent [B, Tl, z, h, w]`` -> diffusers' video ``[B, T, 3, H, W]``."""
    mean, std = stats
    return reference.decode(latent.transpose(1, 2) * std + mean).sample.transpose(1, 2)


@torch.no_grad()
def test_encode_matches_diffusers(layout):
    name, reference, encoder, _, stats, (height, width) = layout
    torch.manual_seed(1)
    video = torch.rand(2, 9, 3, height, width) * 2 - 1
    expected = _diffusers_encode(reference, video, stats)
    actual = encoder(video)
    side = encoder.spatial_compression_ratio
    assert actual.shape == (2, 3, encoder.config.z_dim, height // side, width // side)
    error = (actual - expected).abs().max().item()
    print(f"{name}: encode max abs error {error:.3e}")
    assert error <= TOLERANCE, f"{name}: encode max abs error {error:.3e}"
    assert expected.std() > 0.1


@torch.no_grad()
def test_decode_matches_diffusers(layout):
    name, reference, encoder, decoder, stats, (height, width) = layout
    torch.manual_seed(2)
    side = decoder.spatial_compression_ratio
    latent = torch.randn(1, 3, decoder.config.z_dim, height // side, width // side)
    expected = _diffusers_decode(reference, latent, stats)
    actual = decoder(latent)
    assert actual.shape == expected.shape == (1, 9, 3, height, width)
    error = (actual - expected).abs().max().item()
    print(f"{name}: decode max abs error {error:.3e}")
    assert error <= TOLERANCE, f"{name}: decode max abs error {error:.3e}"
    assert expected.std() > 1e-2


@torch.no_grad()
def test_streaming_encode_and_decode_match_diffusers_one_shot(layout):
    name, reference, encoder, decoder, stats, (height, width) = layout
    torch.manual_seed(3)
    video = torch.rand(1, 13, 3, height, width) * 2 - 1
    cache = encoder.initialize_autoregressive_cache()
    streamed = torch.cat(
        [
            encoder(video[:, :5], 0, cache),
            encoder(video[:, 5:9], 1, cache),
            encoder(video[:, 9:], 2, cache),
        ],
        dim=1,
    )
    error = (streamed - _diffusers_encode(reference, video, stats)).abs().max().item()
    assert error <= TOLERANCE, f"{name}: streamed encode max abs error {error:.3e}"

    latent = torch.randn_like(streamed)
    cache = decoder.initialize_autoregressive_cache()
    streamed = torch.cat(
        [decoder(latent[:, :1], 0, cache), decoder(latent[:, 1:], 1, cache)], dim=1
    )
    error = (streamed - _diffusers_decode(reference, latent, stats)).abs().max().item()
    assert error <= TOLERANCE, f"{name}: streamed decode max abs error {error:.3e}"


def _pack_height_offset_first(video: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The wrong order ``b c t (h q) (w r) -> b (c q r) t h w`` (height offset before width)."""
    b, c, t, height, width = video.shape
    p = patch_size
    x = video.reshape(b, c, t, height // p, p, width // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * p * p, t, height // p, width // p)


def _unpack_height_offset_first(packed: torch.Tensor, patch_size: int) -> torch.Tensor:
    b, cpp, t, h, w = packed.shape
    p = patch_size
    x = packed.reshape(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


@pytest.mark.parametrize("layout", ["wan22_ti2v_5b"], indirect=True)  # packing needs patch 2
@torch.no_grad()
def test_wrong_pixel_packing_order_loads_but_gives_wrong_images(layout, monkeypatch):
    name, reference, encoder, decoder, stats, (height, width) = layout
    torch.manual_seed(4)
    video = torch.rand(1, 5, 3, height, width) * 2 - 1
    latent = torch.randn(1, 2, 48, height // 16, width // 16)
    expected_latent = _diffusers_encode(reference, video, stats)
    expected_video = _diffusers_decode(reference, latent, stats)
    # The wrong order is a self-consistent packing that differs from the Wan 2.2 one.
    packed = _pack_height_offset_first(video.transpose(1, 2), 2)
    assert torch.equal(_unpack_height_offset_first(packed, 2), video.transpose(1, 2))
    assert not torch.equal(packed, vae_module.patchify_video(video.transpose(1, 2), 2))
    monkeypatch.setattr(vae_module, "patchify_video", _pack_height_offset_first)
    monkeypatch.setattr(vae_module, "unpatchify_video", _unpack_height_offset_first)
    latent_error = (encoder(video) - expected_latent).abs().max().item()
    video_error = (decoder(latent) - expected_video).abs().max().item()
    print(f"wrong packing: encode error {latent_error:.3e}, decode error {video_error:.3e}")
    assert latent_error > 100 * TOLERANCE, f"wrong packing encode error only {latent_error:.3e}"
    assert video_error > 100 * TOLERANCE, f"wrong packing decode error only {video_error:.3e}"


def test_wan22_presets_remap_the_diffusers_layout_by_default():
    assert (
        Wan22TI2V5BVAEEncoderConfig().state_dict_transform is wan22_ti2v_5b_vae_state_dict_transform
    )
    assert (
        Wan22TI2V5BVAEDecoderConfig().state_dict_transform is wan22_ti2v_5b_vae_state_dict_transform
    )
    assert WanVAEDecoderConfig().state_dict_transform is None  # original Wan2.1_VAE.pth keys
