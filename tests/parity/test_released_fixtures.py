"""Golden fixtures: files laid out as the public releases lay them out, loaded through the project's
loaders and compared with outputs recorded from the upstream code (max abs <= 1e-4, fp32).

The fixtures and ``references.safetensors`` are made by ``tests/fixtures/make_released_fixtures.py``
(official Wan code from the ``wan22`` distribution; TAEHV / lighttae / Self-Forcing layouts as
their trainers save them). The upstream code is not needed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dit_forward import run_one_chunk
from safetensors.torch import load_file

from flashdreams.recipes.taehv import TeahvVAEDecoderConfig
from flashdreams.recipes.wan.autoencoder import (
    Wan22TI2V5BVAEDecoderConfig,
    Wan22TI2V5BVAEEncoderConfig,
    WanVAEDecoderConfig,
    WanVAEEncoderConfig,
)
from flashdreams.recipes.wan.encoders.clip import CLIPImageEncoderConfig
from flashdreams.recipes.wan.encoders.umt5 import UMT5TextEncoderConfig
from flashdreams.recipes.wan.transformer import (
    Wan21TransformerConfig,
    Wan22TransformerConfig,
    WanDiTNetworkConfig,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "released"
ATOL = 1e-4
MANIFEST = json.loads((FIXTURES / "fixtures.json").read_text())
REFERENCES = load_file(str(FIXTURES / "references.safetensors"))


def _ref(fixture: str, name: str) -> torch.Tensor:
    return REFERENCES[f"{fixture}/{name}"]


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= ATOL, f"max abs difference {difference:.3g} > {ATOL}"
    assert expected.abs().max() > 1e-2  # a reference that is not trivially zero


def test_every_released_file_has_a_fixture():
    for fixture in MANIFEST.values():
        for name in fixture["files"]:
            assert (FIXTURES / name).exists(), name
    assert set(MANIFEST) == {
        "wan21_t2v_single", "wan21_t2v_sharded", "wan21_i2v_sharded", "wan22_ti2v_5b",
        "wan22_a14b", "self_forcing_dmd", "wan21_vae", "wan22_vae", "umt5", "clip",
        "taew2_1", "lighttaew2_1",
    }  # fmt: skip


# --------------------------------------------------------------------------- Wan DiT


def _transformer_config(fixture: str, checkpoint: Path, **overrides) -> Wan21TransformerConfig:
    arch = MANIFEST[fixture]["architecture"]
    network = WanDiTNetworkConfig(
        patch_size=tuple(arch["patch_size"]),
        text_len=arch["text_len"],
        in_dim=arch["in_dim"],
        out_dim=arch["out_dim"],
        dim=arch["dim"],
        ffn_dim=arch["ffn_dim"],
        freq_dim=arch["freq_dim"],
        text_dim=arch["text_dim"],
        num_heads=arch["num_heads"],
        num_layers=arch["num_layers"],
        eps=arch["eps"],
        cross_attn_enable_img=arch.get("cross_attn_enable_img", False),
        img_dim=arch.get("img_dim", 1280),
    )
    num_frames = _ref(fixture, "latent").shape[2]
    config = dict(
        network=network,
        dtype=torch.float32,
        checkpoint_path=str(checkpoint),
        len_t=num_frames,
        window_size_t=0,
        compile_network=False,
        use_cuda_graph=False,
    )
    config.update(overrides)
    return Wan21TransformerConfig(**config)


@torch.no_grad()
def _check_dit(fixture: str, checkpoint: Path, **overrides) -> None:
    """Load ``checkpoint`` through Wan21Transformer and compare one chunk with the reference."""
    transformer = _transformer_config(fixture, checkpoint, **overrides).setup().eval()
    latent = _ref(fixture, "latent")  # official [B, C, F, H, W]
    image = None
    if MANIFEST[fixture]["architecture"].get("cross_attn_enable_img"):
        # upstream concatenates [noise (16); mask (4) + image latent (16)] along channels
        latent = torch.cat([latent, _ref(fixture, "condition")], dim=1)
        image = _ref(fixture, "clip")
    flow = run_one_chunk(
        transformer.network,
        latent.transpose(1, 2),
        _ref(fixture, "timestep"),
        _ref(fixture, "text"),
        image,
    )
    _assert_matches(flow.transpose(1, 2), _ref(fixture, "output"))


@pytest.mark.parametrize(
    "fixture",
    [
        "wan21_t2v_single",
        "wan21_t2v_sharded",
        "wan21_i2v_sharded",
        "wan22_ti2v_5b",
        "self_forcing_dmd",
    ],
)
def test_wan_dit_matches_official(fixture):
    (file_name,) = MANIFEST[fixture]["files"]
    _check_dit(fixture, FIXTURES / file_name)


def test_sharded_folder_given_as_its_index_file():
    index = FIXTURES / "wan21_t2v_sharded" / "diffusion_pytorch_model.safetensors.index.json"
    assert len(json.loads(index.read_text())["weight_map"]) > 0
    _check_dit("wan21_t2v_sharded", index)


def test_self_forcing_file_with_the_plugin_transform():
    from flashdreams_self_forcing import self_forcing_state_dict_transform

    _check_dit(
        "self_forcing_dmd",
        FIXTURES / "self_forcing_dmd.pt",
        state_dict_transform=self_forcing_state_dict_transform,
    )


@torch.no_grad()
def test_wan22_a14b_expert_switch_matches_official():
    """High-noise expert at t = 875 (upstream: t >= boundary), low-noise just below."""
    fixture = "wan22_a14b"
    folders = {
        name: FIXTURES / "wan22_a14b" / name for name in ("high_noise_model", "low_noise_model")
    }
    transformer = Wan22TransformerConfig(
        transformer_high_noise=_transformer_config(fixture, folders["high_noise_model"]),
        transformer_low_noise=_transformer_config(fixture, folders["low_noise_model"]),
        boundary_ratio=MANIFEST[fixture]["architecture"]["boundary_ratio"],
    ).setup()
    latent = _ref(fixture, "latent").transpose(1, 2)  # [B, F, C, H, W]
    height, width = latent.shape[-2:]
    network = transformer.transformer_high_noise.network
    for timestep, name in ((875.0, "output_at_875"), (874.0, "output_at_874")):
        cache = transformer.initialize_autoregressive_cache(
            height=height, width=width, text_embeddings=_ref(fixture, "text")
        )
        tokens = transformer.patchify_and_maybe_split_cp(latent)
        flow = transformer.predict_flow(tokens, torch.tensor(timestep), cache)
        actual = network.unpatchify_and_maybe_gather_cp(height // 2, width // 2, flow)
        _assert_matches(actual.transpose(1, 2), _ref(fixture, name))
    assert transformer.select_branch(torch.tensor(875.0)) == "high_noise"


# --------------------------------------------------------------------------- Wan VAE


def _vae_fields(fixture: str) -> dict:
    arch = MANIFEST[fixture]["architecture"]
    return dict(
        dtype=torch.float32,
        use_cuda_graph=False,
        base_dim=arch["dim"],
        z_dim=arch["z_dim"],
        dim_mult=tuple(arch["dim_mult"]),
        num_res_blocks=arch["num_res_blocks"],
        temporal_downsample=tuple(arch["temperal_downsample"]),
    )


@torch.no_grad()
def test_wan21_vae_pth_matches_official():
    fixture, path = "wan21_vae", str(FIXTURES / "Wan2.1_VAE.pth")
    encoder = WanVAEEncoderConfig(checkpoint_path=path, **_vae_fields(fixture)).setup().eval()
    decoder = WanVAEDecoderConfig(checkpoint_path=path, **_vae_fields(fixture)).setup().eval()
    latent = encoder(_ref(fixture, "video").transpose(1, 2))
    _assert_matches(latent.transpose(1, 2), _ref(fixture, "latent"))
    video = decoder(_ref(fixture, "latent").transpose(1, 2))
    _assert_matches(video.transpose(1, 2), _ref(fixture, "decoded"))


@torch.no_grad()
def test_wan22_vae_pth_matches_official():
    """``Wan2.2_VAE.pth`` (original keys) loads with the TI2V 5B preset, whose transform is diffusers'."""
    fixture, path = "wan22_vae", str(FIXTURES / "Wan2.2_VAE.pth")
    fields = dict(
        _vae_fields(fixture),
        checkpoint_path=path,
        latent_mean=tuple(_ref(fixture, "latent_mean").tolist()),
        latent_std=tuple(_ref(fixture, "latent_std").tolist()),
    )
    encoder = Wan22TI2V5BVAEEncoderConfig(**fields).setup().eval()
    decoder_base_dim = MANIFEST[fixture]["architecture"]["dec_dim"]
    decoder = Wan22TI2V5BVAEDecoderConfig(**fields, decoder_base_dim=decoder_base_dim).setup()
    latent = encoder(_ref(fixture, "video").transpose(1, 2))
    _assert_matches(latent.transpose(1, 2), _ref(fixture, "latent"))
    video = decoder.eval()(_ref(fixture, "latent").transpose(1, 2))
    _assert_matches(video.transpose(1, 2), _ref(fixture, "decoded"))


# --------------------------------------------------------------------------- encoders


@torch.no_grad()
def test_umt5_pth_matches_official():
    fixture = "umt5"
    arch = MANIFEST[fixture]["architecture"]
    encoder = UMT5TextEncoderConfig(
        checkpoint_path=str(FIXTURES / "models_t5_umt5-xxl-enc-bf16.pth"),
        tokenizer_path="builtin:bytes",
        dtype=torch.float32,
        model_dim=arch["dim"],
        num_layers=arch["num_layers"],
        num_heads=arch["num_heads"],
        ffn_dim=arch["dim_ffn"],
        vocab_size=arch["vocab"],
        num_relative_buckets=arch["num_buckets"],
    ).setup()
    ids, mask = _ref(fixture, "input_ids"), _ref(fixture, "attention_mask")
    hidden = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = _ref(fixture, "hidden")
    valid = mask.bool()  # upstream keeps each prompt's real tokens only
    _assert_matches(hidden[valid], expected[valid])


@torch.no_grad()
def test_clip_pth_matches_official():
    fixture = "clip"
    arch = MANIFEST[fixture]["architecture"]
    encoder = CLIPImageEncoderConfig(
        checkpoint_path=str(FIXTURES / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"),
        image_size=arch["image_size"],
        dtype=torch.float32,
        hidden_size=arch["vision_dim"],
        num_layers=arch["vision_layers"],
        num_heads=arch["vision_heads"],
        intermediate_size=arch["vision_dim"] * arch["vision_mlp_ratio"],
        patch_size=arch["patch_size"],
    ).setup()
    _assert_matches(encoder(_ref(fixture, "image")), _ref(fixture, "tokens"))


# --------------------------------------------------------------------------- TAEHV


@pytest.mark.parametrize(
    "fixture, file_name",
    [
        ("taew2_1", "taew2_1.pth"),
        ("lighttaew2_1", "lighttaew2_1.pth"),
        ("lighttaew2_1", "lighttaew2_1.safetensors"),
    ],
)
@torch.no_grad()
def test_taehv_checkpoints_match_upstream(fixture, file_name):
    """taew2_1 decodes the normalised latent; lighttae decodes z * std + mean (Wan 2.1 stats)."""
    arch = MANIFEST[fixture]["architecture"]
    decoder = TeahvVAEDecoderConfig(
        checkpoint_path=str(FIXTURES / file_name),
        dtype=torch.float32,
        use_compile=False,
        use_cuda_graph=False,
        latent_channels=arch["latent_channels"],
        decoder_channels=tuple(arch["decoder_channels"]),
    ).setup()
    assert decoder.unnormalize_latent == file_name.startswith("lighttae")
    video = decoder.eval()(_ref(fixture, "latent"))
    _assert_matches(video, _ref(fixture, "video") * 2 - 1)
