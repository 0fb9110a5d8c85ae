"""Checkpoint layouts as released: nested training files, diffusers folders with default configs."""

from __future__ import annotations

import re

import diffusers  # dev extra: the diffusers folders below are made with save_pretrained
import pytest
import torch

from flashdreams.core.checkpoint import load_checkpoint
from flashdreams.core.checkpoint.layout import find_layout
from flashdreams.launch.cli import compose
from flashdreams.launch.run_config import build_run_config
from flashdreams.recipes.wan.autoencoder import (
    WanVAEDecoderConfig,
    wan21_diffusers_vae_state_dict_transform,
)
from flashdreams.recipes.wan.transformer import (
    Wan21TransformerConfig,
    WanDiTNetwork,
    WanDiTNetworkTinyConfig,
    wan_diffusers_state_dict_transform,
)
from flashdreams.recipes.wan.transformer.checkpoint import WAN_DIT_LAYOUT_MARKERS


def _wan_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random tiny Wan DiT weights in the original (unfused) key layout."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in WanDiTNetwork(WanDiTNetworkTinyConfig()).state_dict().items()}


def _self_forcing_file(path, seeds=(1, 2, 3)) -> dict[str, dict[str, torch.Tensor]]:
    """``self_forcing_dmd.pt`` as the Self-Forcing trainer saves it: three state dicts in one file."""
    nested = {
        name: {f"model.{k}": v for k, v in _wan_state_dict(seed).items()}
        for name, seed in zip(("generator", "critic", "generator_ema"), seeds)
    }
    torch.save(nested, path)
    return nested


def _flow(transformer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 6, transformer.config.network.text_dim, generator=generator)
    cache = transformer.initialize_autoregressive_cache(height=4, width=4, text_embeddings=text)
    x = torch.randn(transformer.latent_shape, generator=generator)
    with torch.no_grad():
        return transformer.predict_flow(x, torch.tensor(500.0), cache)


def _tiny_transformer(**overrides):
    config = dict(
        network=WanDiTNetworkTinyConfig(),
        dtype=torch.float32,
        len_t=3,
        window_size_t=6,
        compile_network=False,
        use_cuda_graph=False,
    )
    config.update(overrides)
    return Wan21TransformerConfig(**config).setup().eval()


def test_load_checkpoint_flattens_a_file_of_state_dicts(tmp_path):
    nested = _self_forcing_file(tmp_path / "self_forcing_dmd.pt")
    flat = load_checkpoint(tmp_path / "self_forcing_dmd.pt")
    assert len(flat) == 3 * len(nested["generator"])
    key = "generator_ema.model.blocks.0.self_attn.q.weight"
    assert torch.equal(flat[key], nested["generator_ema"]["model.blocks.0.self_attn.q.weight"])


def test_self_forcing_file_loads_through_the_slug_config(tmp_path):
    """The plugin's slug config (``self_forcing_generator`` transform) loads the EMA generator."""
    path = tmp_path / "self_forcing_dmd.pt"
    nested = _self_forcing_file(path)
    container = compose(
        "self-forcing-tiny", [f"pipeline.diffusion_model.transformer.checkpoint_path={path}"]
    )
    transformer_config = build_run_config(container).pipeline.diffusion_model.transformer
    assert transformer_config.state_dict_transform.__name__ == "self_forcing_state_dict_transform"
    from_slug = transformer_config.setup().eval()
    ema_only = {k.removeprefix("model."): v for k, v in nested["generator_ema"].items()}
    torch.save(ema_only, tmp_path / "ema.pth")
    reference = _tiny_transformer(checkpoint_path=str(tmp_path / "ema.pth"))
    torch.testing.assert_close(_flow(from_slug), _flow(reference), rtol=0, atol=0)
    generator_only = {k.removeprefix("model."): v for k, v in nested["generator"].items()}
    torch.save(generator_only, tmp_path / "generator.pth")
    not_ema = _tiny_transformer(checkpoint_path=str(tmp_path / "generator.pth"))
    assert (_flow(from_slug) - _flow(not_ema)).abs().max() > 1e-3


def test_self_forcing_file_loads_with_the_default_python_config(tmp_path):
    """No transform set: the nested layout is detected and the EMA generator taken."""
    path = tmp_path / "self_forcing_dmd.pt"
    nested = _self_forcing_file(path)
    ema_only = {k.removeprefix("model."): v for k, v in nested["generator_ema"].items()}
    torch.save(ema_only, tmp_path / "ema.pth")
    torch.testing.assert_close(
        _flow(_tiny_transformer(checkpoint_path=str(path))),
        _flow(_tiny_transformer(checkpoint_path=str(tmp_path / "ema.pth"))),
        rtol=0,
        atol=0,
    )


def _diffusers_dit_folder(tmp_path):
    network = WanDiTNetworkTinyConfig()
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=tuple(network.patch_size),
        num_attention_heads=network.num_heads,
        attention_head_dim=network.dim // network.num_heads,
        in_channels=network.in_dim,
        out_channels=network.out_dim,
        text_dim=network.text_dim,
        freq_dim=network.freq_dim,
        ffn_dim=network.ffn_dim,
        num_layers=network.num_layers,
    )
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    return folder


def test_diffusers_folder_loads_with_the_default_python_config(tmp_path):
    folder = _diffusers_dit_folder(tmp_path)
    default = _tiny_transformer(checkpoint_path=str(folder))
    assert default.config.state_dict_transform is None
    explicit = _tiny_transformer(
        checkpoint_path=str(folder), state_dict_transform=wan_diffusers_state_dict_transform
    )
    torch.testing.assert_close(_flow(default), _flow(explicit), rtol=0, atol=0)


def test_unknown_dit_layout_stops_with_one_line(tmp_path):
    torch.save(
        {"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, tmp_path / "x.pt"
    )
    with pytest.raises(ValueError) as error:
        _tiny_transformer(checkpoint_path=str(tmp_path / "x.pt"))
    message = str(error.value)
    assert "\n" not in message
    assert re.search(
        r"is not a Wan DiT checkpoint in a known layout: looked for original Wan keys "
        r"\(e.g. 'blocks.0.self_attn.q.weight'\), diffusers keys .*; its first keys are "
        r"'encoder.weight', 'decoder.bias'. Set state_dict_transform",
        message,
    )


def test_training_checkpoint_without_a_generator_asks_for_a_transform():
    state = {
        f"{name}.blocks.0.self_attn.q.weight": torch.zeros(1) for name in ("critic", "teacher")
    }
    with pytest.raises(
        ValueError,
        match=r"several Wan DiT state dicts \('critic.', 'teacher.'\) and none of them is a generator",
    ):
        find_layout(state, WAN_DIT_LAYOUT_MARKERS, what="Wan DiT", source="f.pt")


def test_diffusers_vae_folder_loads_with_the_default_python_config(tmp_path):
    dims = dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, z_dim=4)
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in dims.items()}
    ).save_pretrained(tmp_path / "vae")
    common = dict(
        checkpoint_path=str(tmp_path / "vae"),
        dtype=torch.float32,
        use_cuda_graph=False,
        latent_mean=(0.0,) * 4,
        latent_std=(1.0,) * 4,
        **dims,
    )
    default = WanVAEDecoderConfig(**common).setup().eval()
    explicit = WanVAEDecoderConfig(
        **common, state_dict_transform=wan21_diffusers_vae_state_dict_transform
    ).setup()
    latent = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(default(latent), explicit.eval()(latent), rtol=0, atol=0)
