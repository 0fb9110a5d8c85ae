"""LoRA parity with diffusers: the same random LoRA file loaded by diffusers and by flashdreams.

A tiny ``WanTransformer3DModel`` (seeded random weights, as in ``test_wan_dit_parity``) gets a
random PEFT LoRA through ``WanPipeline.load_lora_weights``; flashdreams loads the same base
weights into :class:`WanDiTNetwork` (fused QKV, reordered head) and the same file through
:class:`~flashdreams.recipes.wan.lora.WanLoRAs`. One full-sequence forward each, fp32:
max abs difference <= 1e-5 at strength 1.0 and 0.5. The same LoRA weights re-saved in the
community layouts (kohya / musubi-tuner, original Wan keys with ``lora_A`` or ``lora_down``,
with and without the ``diffusion_model.`` prefix) load to the same network output, and
diffusers' own converters agree with us on them too.
"""

from __future__ import annotations

import warnings

import diffusers
import pytest
import torch
from diffusers import WanPipeline
from dit_forward import run_one_chunk
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from test_wan_dit_parity import CASES, _build_pair, _inputs, _run_reference

from flashdreams.recipes.wan.lora import WanLoRAs
from flashdreams.recipes.wan.transformer import wan_diffusers_state_dict_transform

ATOL = 1e-5
RANK, ALPHA = 4, 8.0
BLOCK_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]
"""Everything musubi-tuner trains (self / cross attention and FFN of every block)."""
ALL_TARGETS = [*BLOCK_TARGETS, "add_k_proj", "add_v_proj", "proj_out", "time_proj", "linear_1"]
"""Plus the I2V image K/V, the output head, the time projection and the first
text / time / image embedding layers."""


def _random_peft_lora(case: str, targets: list[str], *, lora_bias: bool):
    """``(state dict, LoraConfig)`` of a random PEFT LoRA on a ``case``-shaped model."""
    kwargs = CASES[case][0]
    targets = [t for t in targets if t not in ("add_k_proj", "add_v_proj") or "image_dim" in kwargs]
    donor = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), freq_dim=32, ffn_dim=48, num_layers=2, **kwargs
    )
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_bias=lora_bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        donor.add_adapter(config, adapter_name="donor")
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in donor.named_parameters():
            if "lora" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft mistakes the 1-D lora_B.bias for a shard
            state_dict = get_peft_model_state_dict(donor, adapter_name="donor")
    return {key: value.clone() for key, value in state_dict.items()}, config


def _save_peft(state_dict, config, folder):
    WanPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=state_dict,
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def _load_into_diffusers(reference, path):
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, transformer=reference, vae=None, scheduler=None
    )
    pipe.load_lora_weights(str(path), adapter_name="lora")


def _community_files(state_dict, folder):
    """The PEFT LoRA re-saved in the community layouts, alpha in the file."""
    wan = wan_diffusers_state_dict_transform(state_dict)  # diffusers names -> Wan names
    alpha = torch.tensor(ALPHA)
    modules = sorted({key.removesuffix(".lora_A.weight") for key in wan if "lora_A" in key})
    layouts = {
        "kohya": ("lora_unet_", "lora_down", "lora_up", lambda m: m.replace(".", "_")),
        "wan_prefixed_lora_A": ("diffusion_model.", "lora_A", "lora_B", str),
        "wan_lora_down": ("", "lora_down", "lora_up", str),
    }
    files = {}
    for layout, (prefix, down, up, spell) in layouts.items():
        tensors = {}
        for module in modules:
            key = prefix + spell(module)
            tensors[f"{key}.{down}.weight"] = wan[f"{module}.lora_A.weight"]
            tensors[f"{key}.{up}.weight"] = wan[f"{module}.lora_B.weight"]
            tensors[f"{key}.alpha"] = alpha.clone()
        files[layout] = folder / f"{layout}.safetensors"
        save_file(tensors, files[layout])
    return files


@pytest.mark.parametrize("case", ["t2v", "i2v"])
@torch.no_grad()
def test_peft_lora_matches_diffusers_at_strength_1_and_half(case, tmp_path):
    reference, network, grid, num_text, num_image = _build_pair(case, tmp_path, fuse=True)
    state_dict, config = _random_peft_lora(case, ALL_TARGETS, lora_bias=True)
    path = _save_peft(state_dict, config, tmp_path / "peft")
    latent, text, image = _inputs(network, grid, num_text, num_image)
    timestep = torch.tensor([937.5, 12.25])
    base = run_one_chunk(network, latent, timestep, text, image)
    _load_into_diffusers(reference, path)
    loras = WanLoRAs(network)
    loras.add(path, name="lora")
    for strength in (1.0, 0.5):
        reference.set_adapters(["lora"], weights=[strength])
        loras.set_strength("lora", strength)
        ref = _run_reference(reference, latent, timestep, text, image)
        ours = run_one_chunk(network, latent, timestep, text, image)
        error = (ours - ref).abs().max().item()
        print(f"{case} strength {strength}: max abs diff {error:.3e}")
        assert error <= ATOL
        # the LoRA really changes the output
        assert (ours - base).abs().max() > 100 * ATOL
    # run-time (unfused) application agrees too
    loras.unfuse()
    assert (run_one_chunk(network, latent, timestep, text, image) - ref).abs().max() <= ATOL


@torch.no_grad()
def test_community_layouts_load_to_the_same_result(tmp_path):
    reference, network, grid, num_text, num_image = _build_pair("t2v", tmp_path, fuse=True)
    state_dict, config = _random_peft_lora("t2v", BLOCK_TARGETS, lora_bias=False)
    files = {"peft": _save_peft(state_dict, config, tmp_path / "peft")}
    files.update(_community_files(state_dict, tmp_path))
    latent, text, image = _inputs(network, grid, num_text, num_image)
    timestep = torch.tensor([937.5, 12.25])
    outputs = {}
    for layout, path in files.items():
        loras = WanLoRAs(network)
        loras.add(path, strength=0.75)
        outputs[layout] = run_one_chunk(network, latent, timestep, text, image)
        loras.clear()
    for layout, output in outputs.items():
        assert torch.equal(output, outputs["peft"]), layout
    # diffusers' converters read the kohya and prefixed Wan files to the same model
    for layout in ("peft", "kohya", "wan_prefixed_lora_A"):
        torch.manual_seed(0)
        fresh, _, _, _, _ = _build_pair("t2v", tmp_path / layout, fuse=True)
        _load_into_diffusers(fresh, files[layout])
        fresh.set_adapters(["lora"], weights=[0.75])
        ref = _run_reference(fresh, latent, timestep, text, image)
        error = (outputs[layout] - ref).abs().max().item()
        print(f"{layout}: max abs diff vs diffusers {error:.3e}")
        assert error <= ATOL, layout


@torch.no_grad()
def test_wan_diff_b_keys_match_diffusers(tmp_path):
    """LightX2V-style original-Wan keys with ``diff_b`` bias deltas (diffusers: lora_B.bias)."""
    reference, network, grid, num_text, num_image = _build_pair("t2v", tmp_path, fuse=True)
    state_dict, _ = _random_peft_lora("t2v", BLOCK_TARGETS, lora_bias=True)
    tensors = {}
    for key, value in wan_diffusers_state_dict_transform(state_dict).items():
        key = key.replace(".lora_B.bias", ".diff_b")
        tensors[f"diffusion_model.{key}"] = value
    path = tmp_path / "wan_diff_b.safetensors"
    save_file(tensors, path)
    _load_into_diffusers(reference, path)
    WanLoRAs(network).add(path)
    latent, text, image = _inputs(network, grid, num_text, num_image)
    timestep = torch.tensor([937.5, 12.25])
    ref = _run_reference(reference, latent, timestep, text, image)
    ours = run_one_chunk(network, latent, timestep, text, image)
    assert (ours - ref).abs().max() <= ATOL
