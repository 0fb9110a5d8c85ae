"""LoRA adapters on the Wan DiT (flashdreams.recipes.wan.lora), tiny random networks, fp32.

Where a LoRA lands in the fused network (QKV slice, reordered head), fuse / unfuse /
clear restoring the weights bit for bit, fused == run-time outputs, in-place swaps and
re-weights equal to a fresh application, full-size ``diff`` deltas, alpha from the file,
bad input leaving the network untouched, and the ``transformer.loras`` config / CLI path.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from flashdreams.recipes.wan.lora import LoRAConfig, LoRALinear, WanLoRAs, load_lora
from flashdreams.recipes.wan.transformer import (
    Wan21TransformerConfig,
    Wan22TransformerConfig,
    WanDiTNetwork,
    WanDiTNetworkTinyConfig,
)
from flashdreams.recipes.wan.transformer.cuda_graph import CUDAGraphWrapper
from flashdreams.recipes.wan.transformer.impl.rope import WanRope

DIM, FFN_DIM, RANK = 32, 64, 3
LINEAR_MODULES = {
    # original Wan name -> (out, in) of its weight in the tiny network
    "blocks.0.self_attn.q": (DIM, DIM),
    "blocks.0.self_attn.k": (DIM, DIM),
    "blocks.1.self_attn.v": (DIM, DIM),
    "blocks.1.self_attn.o": (DIM, DIM),
    "blocks.0.cross_attn.q": (DIM, DIM),
    "blocks.1.cross_attn.k": (DIM, DIM),
    "blocks.0.ffn.0": (FFN_DIM, DIM),
    "blocks.1.ffn.2": (DIM, FFN_DIM),
    "head.head": (16 * 4, DIM),
    "time_projection.1": (6 * DIM, DIM),
    "text_embedding.0": (DIM, 32),
}


def _network(*, fused: bool = True, seed: int = 0) -> WanDiTNetwork:
    torch.manual_seed(seed)
    network = WanDiTNetwork(WanDiTNetworkTinyConfig()).eval()
    with torch.no_grad():  # non-zero biases and norm weights
        for name, param in network.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    if fused:
        network.update_parameters_after_loading_checkpoint()
    return network


def _tensors(
    modules=LINEAR_MODULES, *, seed: int, alpha: float | None = 6.0, prefix="diffusion_model."
):
    """A random LoRA in the original-Wan layout (``lora_down`` / ``lora_up`` / ``alpha``)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in modules.items():
        key = prefix + module
        tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, in_features, generator=generator)
        tensors[f"{key}.lora_up.weight"] = 0.1 * torch.randn(
            out_features, RANK, generator=generator
        )
        tensors[f"{key}.diff_b"] = 0.1 * torch.randn(out_features, generator=generator)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def _save(tmp_path, name: str, tensors: dict, metadata: dict | None = None):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _weights(network: WanDiTNetwork) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in network.state_dict().items()}


def _assert_same_weights(network: WanDiTNetwork, expected: dict[str, torch.Tensor]) -> None:
    current = network.state_dict()
    assert current.keys() == expected.keys()
    changed = [key for key in expected if not torch.equal(current[key], expected[key])]
    assert not changed, changed


@torch.no_grad()
def _forward(network: WanDiTNetwork) -> torch.Tensor:
    """One bidirectional chunk (2 frames, 4 x 4 latent), fixed inputs."""
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 2, 16, 4, 4, generator=generator)
    text = torch.randn(1, 6, 32, generator=generator)
    tokens = network.patchify_and_maybe_split_cp(latent.to(network.head.head.weight.dtype))
    cache = network.initialize_cache(
        chunk_size=tokens.shape[1], window_size=0, sink_size=0, text_embeddings=text
    )
    rope = WanRope(head_dim=network.config.head_dim, num_height_tokens=2, num_width_tokens=2)
    return network(tokens, torch.tensor([500.0]), cache, rope.chunk_freqs(0, 2))


def test_lora_on_k_touches_only_its_slice_of_the_fused_qkv(tmp_path):
    network = _network()
    before = _weights(network)
    tensors = _tensors({"blocks.0.self_attn.k": (DIM, DIM)}, seed=1)
    WanLoRAs(network).add(_save(tmp_path, "k", tensors), strength=0.5)
    after = network.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"blocks.0.self_attn.qkv.weight", "blocks.0.self_attn.qkv.bias"}
    key = "diffusion_model.blocks.0.self_attn.k"
    scale = 6.0 / RANK
    update = tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
    k_rows = slice(DIM, 2 * DIM)
    want = before["blocks.0.self_attn.qkv.weight"][k_rows] + 0.5 * scale * update
    torch.testing.assert_close(after["blocks.0.self_attn.qkv.weight"][k_rows], want)
    want_bias = before["blocks.0.self_attn.qkv.bias"][k_rows] + 0.5 * tensors[f"{key}.diff_b"]
    torch.testing.assert_close(after["blocks.0.self_attn.qkv.bias"][k_rows], want_bias)
    for rows in (slice(0, DIM), slice(2 * DIM, 3 * DIM)):  # q and v untouched, bit for bit
        assert torch.equal(
            after["blocks.0.self_attn.qkv.weight"][rows],
            before["blocks.0.self_attn.qkv.weight"][rows],
        )
        assert torch.equal(
            after["blocks.0.self_attn.qkv.bias"][rows], before["blocks.0.self_attn.qkv.bias"][rows]
        )


def test_fused_layout_gets_exactly_the_unfused_layouts_update(tmp_path):
    """QKV slices and the reordered head: applying to the load-time layout and then fusing
    gives the same weights as applying to the fused network."""
    path = _save(tmp_path, "all", _tensors(seed=2))
    unfused = _network(fused=False)
    WanLoRAs(unfused).add(path, strength=0.8)
    unfused.update_parameters_after_loading_checkpoint()
    fused = _network(fused=True)
    WanLoRAs(fused).add(path, strength=0.8)
    _assert_same_weights(fused, _weights(unfused))


def test_fuse_unfuse_restore_bit_for_bit_and_agree(tmp_path):
    network = _network()
    original = _weights(network)
    base = _forward(network)
    loras = WanLoRAs(network)
    loras.add(_save(tmp_path, "a", _tensors(seed=3)), fused=False)
    _assert_same_weights(network, original)  # run-time mode leaves the weights alone
    unfused_out = _forward(network)
    assert (unfused_out - base).abs().max() > 1e-2
    loras.fuse()
    assert not torch.equal(network.state_dict()["head.head.weight"], original["head.head.weight"])
    fused_out = _forward(network)
    assert (fused_out - unfused_out).abs().max() <= 1e-5
    loras.unfuse()
    _assert_same_weights(network, original)
    assert torch.equal(_forward(network), unfused_out)
    loras.fuse()
    loras.clear()
    _assert_same_weights(network, original)
    assert torch.equal(_forward(network), base)
    assert type(network.blocks[0].self_attn.qkv) is torch.nn.Linear


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "runtime"])
def test_swaps_and_reweights_equal_a_fresh_application(tmp_path, fused):
    path_a = _save(tmp_path, "a", _tensors(seed=4))
    path_b = _save(tmp_path, "b", _tensors(dict(list(LINEAR_MODULES.items())[3:]), seed=5))
    network = _network()
    loras = WanLoRAs(network)
    loras.add(path_a, strength=1.0, fused=fused)
    loras.add(path_b, strength=0.3, fused=fused)
    loras.set_strength("a", 0.25)
    loras.remove("b")
    loras.replace([LoRAConfig(path=str(path_b), strength=0.7, fused=fused)])
    fresh = _network()
    WanLoRAs(fresh).add(path_b, strength=0.7, fused=fused)
    _assert_same_weights(network, _weights(fresh))
    assert torch.equal(_forward(network), _forward(fresh))
    assert loras.names == ["b"] and loras.strength("b") == 0.7
    # a mixed set: one fused, one run-time, re-weighted in place
    loras.add(path_a, strength=0.5, fused=not fused)
    loras.set_strength("b", -0.2)
    mixed = _network()
    mixed_loras = WanLoRAs(mixed)
    mixed_loras.add(path_b, strength=-0.2, fused=fused)
    mixed_loras.add(path_a, strength=0.5, fused=not fused)
    _assert_same_weights(network, _weights(mixed))
    assert torch.equal(_forward(network), _forward(mixed))


def test_runtime_adapters_under_torch_compile(tmp_path):
    """Compiled blocks see run-time adapters added, re-weighted and swapped after the
    compile; a re-weight or a same-rank swap reuses the compiled graphs."""
    path_a = _save(tmp_path, "a", _tensors(seed=15))
    path_b = _save(tmp_path, "b", _tensors(seed=16))
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    compiled, eager = _network(), _network()
    compiled.compile_blocks(backend=counting_backend, dynamic=False)
    loras = {"compiled": WanLoRAs(compiled), "eager": WanLoRAs(eager)}

    def check() -> None:
        assert torch.equal(_forward(compiled), _forward(eager))

    check()
    for each in loras.values():
        each.add(path_a, fused=False)
    check()
    num_graphs = len(graphs)
    for each in loras.values():
        each.set_strength("a", 0.3)
    check()
    for each in loras.values():
        each.replace([LoRAConfig(path=str(path_b), strength=-0.5, fused=False)])
    check()
    assert len(graphs) == num_graphs  # same shapes: no recompile
    for each in loras.values():
        each.fuse()
    check()
    for each in loras.values():
        each.clear()
    check()


def test_runtime_terms_follow_the_network_to_another_dtype(tmp_path):
    """``network.to(...)`` (what ``pipeline.to(device)`` does) moves the run-time terms."""
    network = _network()
    loras = WanLoRAs(network)
    loras.add(_save(tmp_path, "a", _tensors(seed=17)), fused=False)
    runtime = _forward(network)
    network.to(torch.bfloat16)
    term = network.blocks[0].self_attn.qkv.terms[0]
    assert term.down.dtype == term.up.dtype == term.bias.dtype == torch.bfloat16
    loras.add(_save(tmp_path, "b", _tensors(seed=18)), fused=False)  # rebuilds a's terms
    assert [term.up.dtype for term in network.blocks[0].self_attn.qkv.terms] == [torch.bfloat16] * 2
    loras.remove("b")
    network.to(torch.float32)
    term = network.blocks[0].self_attn.qkv.terms[0]
    assert term.down.dtype == term.up.dtype == term.bias.dtype == torch.float32
    error = (_forward(network) - runtime).abs().max() / runtime.abs().max()
    assert 0 < error < 3e-2  # went through bf16 and back


def test_full_size_diff_keys_on_linears_norms_and_modulation(tmp_path):
    network = _network()
    before = _weights(network)
    generator = torch.Generator().manual_seed(6)
    tensors = {
        "diffusion_model.blocks.0.ffn.0.diff": torch.randn(FFN_DIM, DIM, generator=generator),
        "diffusion_model.blocks.1.norm3.diff": torch.randn(DIM, generator=generator),
        "diffusion_model.blocks.1.norm3.diff_b": torch.randn(DIM, generator=generator),
        "diffusion_model.blocks.0.modulation.diff": torch.randn(1, 6, DIM, generator=generator),
        "diffusion_model.head.head.diff": torch.randn(64, DIM, generator=generator),
        # two parts of the fused qkv, neither low-rank: one merged run-time term
        "diffusion_model.blocks.1.self_attn.q.diff": torch.randn(DIM, DIM, generator=generator),
        "diffusion_model.blocks.1.self_attn.v.diff_b": torch.randn(DIM, generator=generator),
    }
    loras = WanLoRAs(network)
    loras.add(_save(tmp_path, "diff", tensors), strength=0.5, fused=False)
    after = network.state_dict()
    for name in ("blocks.1.norm3.diff", "blocks.0.modulation.diff"):  # always folded
        key = name.replace(".diff", ".weight").replace("modulation.weight", "modulation")
        assert torch.equal(after[key], before[key] + 0.5 * tensors[f"diffusion_model.{name}"])
    assert torch.equal(
        after["blocks.1.norm3.bias"],
        before["blocks.1.norm3.bias"] + 0.5 * tensors["diffusion_model.blocks.1.norm3.diff_b"],
    )
    # the linear layers keep their weights in run-time mode: their diffs run in hooks
    for key in ("blocks.0.ffn.0.weight", "head.head.weight", "blocks.1.self_attn.qkv.bias"):
        assert torch.equal(after[key], before[key])
    runtime = _forward(network)
    assert (runtime - _forward(_network())).abs().max() > 1e-2
    loras.fuse()
    diff = tensors["diffusion_model.blocks.0.ffn.0.diff"]
    assert torch.equal(
        network.state_dict()["blocks.0.ffn.0.weight"], before["blocks.0.ffn.0.weight"] + 0.5 * diff
    )
    assert (_forward(network) - runtime).abs().max() <= 1e-5
    loras.clear()
    _assert_same_weights(network, before)


def test_alpha_comes_from_the_file(tmp_path):
    modules = {"blocks.0.ffn.0": (FFN_DIM, DIM)}
    kohya = {
        "lora_unet_blocks_0_ffn_0.lora_down.weight": torch.ones(4, DIM),
        "lora_unet_blocks_0_ffn_0.lora_up.weight": torch.ones(FFN_DIM, 4),
        "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(2.0),
    }
    assert load_lora(_save(tmp_path, "kohya", kohya)).updates["blocks.0.ffn.0"].scale == 0.5
    no_alpha = _tensors(modules, seed=7, alpha=None)
    assert load_lora(_save(tmp_path, "none", no_alpha)).updates["blocks.0.ffn.0"].scale == 1.0
    peft = {
        "transformer.blocks.0.ffn.net.0.proj.lora_A.weight": torch.ones(4, DIM),
        "transformer.blocks.0.ffn.net.0.proj.lora_B.weight": torch.ones(FFN_DIM, 4),
        "transformer.blocks.0.ffn.net.2.lora_A.weight": torch.ones(4, FFN_DIM),
        "transformer.blocks.0.ffn.net.2.lora_B.weight": torch.ones(DIM, 4),
    }
    config = {"r": 4, "lora_alpha": 16, "alpha_pattern": {"net.2": 2}}
    pipeline_level = {f"transformer.{key}": value for key, value in config.items()}
    for metadata, rslora in (
        (config, False),
        (pipeline_level, False),
        ({**config, "use_rslora": True}, True),
    ):
        raw = {"lora_adapter_metadata": json.dumps(metadata)}
        updates = load_lora(_save(tmp_path, "peft", peft, raw)).updates
        denominator = 2.0 if rslora else 4.0
        assert updates["blocks.0.ffn.0"].scale == 16 / denominator
        assert updates["blocks.0.ffn.2"].scale == 2 / denominator


def _bad_inputs(tmp_path):
    good = _tensors({"blocks.0.ffn.0": (FFN_DIM, DIM)}, seed=8)
    flux = {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
    }
    rank_mismatch = dict(good)
    rank_mismatch["diffusion_model.blocks.0.ffn.0.lora_up.weight"] = torch.zeros(FFN_DIM, RANK + 1)
    other_size = _tensors({"blocks.0.ffn.0": (FFN_DIM, 2 * DIM)}, seed=8)
    no_up = {k: v for k, v in good.items() if "lora_up" not in k}
    t2v_missing = _tensors(
        {"blocks.0.cross_attn.k_img": (DIM, DIM), "blocks.5.ffn.0": (FFN_DIM, DIM)}, seed=8
    )
    pickle_path = tmp_path / "lora.pt"
    torch.save(good, pickle_path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    another_model = (
        "3 key(s) that are not a Wan DiT LoRA (e.g. lora_unet_down_blocks_0_attentions_0_proj_in"
        ".lora_down.weight, transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight, "
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight); is it for another "
        "model? Layouts understood: diffusers/PEFT"
    )
    wrong_size = (
        "module 'blocks.0.ffn.0': shapes do not fit the network: down (3, 64), up (64, 3) vs "
        "weight (64, 32)"
    )
    lacking = "targets 2 module(s) this network does not have: blocks.0.cross_attn.k_img, blocks.5"
    rank = "module 'blocks.0.ffn.0' has mismatched rank shapes: down (3, 32), up (64, 4)"
    return {
        "keys for another model": (_save(tmp_path, "flux", flux), ValueError, another_model),
        "mismatched rank shapes": (_save(tmp_path, "rank", rank_mismatch), ValueError, rank),
        "another model size": (_save(tmp_path, "size", other_size), ValueError, wrong_size),
        "up matrix missing": (_save(tmp_path, "no_up", no_up), ValueError, "but no up matrix"),
        "modules the network lacks": (_save(tmp_path, "i2v", t2v_missing), ValueError, lacking),
        "missing file": (tmp_path / "nope.safetensors", FileNotFoundError, "LoRA file not found"),
        "pickle": (pickle_path, ValueError, "is not a .safetensors file; pickled formats"),
        "corrupt safetensors": (corrupt, ValueError, "is not a readable safetensors file"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "keys for another model",
        "mismatched rank shapes",
        "another model size",
        "up matrix missing",
        "modules the network lacks",
        "missing file",
        "pickle",
        "corrupt safetensors",
    ],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "runtime"])
def test_bad_input_is_a_clear_error_and_changes_nothing(tmp_path, case, fused):
    path, error, message = _bad_inputs(tmp_path)[case]
    network = _network()
    loras = WanLoRAs(network)
    loras.add(_save(tmp_path, "good", _tensors(seed=9)), strength=0.5, fused=fused)
    weights = _weights(network)
    output = _forward(network)
    with pytest.raises(error) as raised:
        loras.add(path, fused=fused)
    assert message in str(raised.value)
    with pytest.raises(error):  # a swap to a set holding the bad file changes nothing either
        loras.replace(
            [LoRAConfig(path=str(tmp_path / "good.safetensors")), LoRAConfig(path=str(path))]
        )
    assert loras.names == ["good"]
    _assert_same_weights(network, weights)
    assert torch.equal(_forward(network), output)


def test_bad_calls(tmp_path):
    loras = WanLoRAs(_network())
    path = _save(tmp_path, "a", _tensors(seed=10))
    loras.add(path)
    with pytest.raises(ValueError, match="a LoRA adapter named 'a' is already applied"):
        loras.add(path)
    with pytest.raises(
        KeyError, match=r"no LoRA adapter named 'b' is applied \(applied: \['a'\]\)"
    ):
        loras.set_strength("b", 1.0)
    with pytest.raises(ValueError, match="strength must be finite"):
        loras.add(path, strength=float("nan"), name="c")
    loras.add(path, name="c")
    assert loras.names == ["a", "c"]
    with pytest.raises(ValueError, match="LoRA 'c': strength must be finite, got inf"):
        loras.set_strength("c", float("inf"))
    assert loras.strength("c") == 1.0


def test_context_projection_flag(tmp_path):
    loras = WanLoRAs(_network())
    loras.add(_save(tmp_path, "ffn", _tensors({"blocks.0.ffn.0": (FFN_DIM, DIM)}, seed=11)))
    assert not loras.touches_context_projections
    loras.add(_save(tmp_path, "cross", _tensors({"blocks.1.cross_attn.k": (DIM, DIM)}, seed=11)))
    assert loras.touches_context_projections


def _tiny_transformer_config(**changes) -> Wan21TransformerConfig:
    fields = dict(len_t=2, window_size_t=4, compile_network=False, use_cuda_graph=False)
    return Wan21TransformerConfig(
        network=WanDiTNetworkTinyConfig(), dtype=torch.float32, **(fields | changes)
    )


def test_transformer_config_applies_loras_per_expert(tmp_path):
    path_a = _save(tmp_path, "a", _tensors(seed=12))
    path_b = _save(tmp_path, "b", _tensors(seed=13))
    torch.manual_seed(0)
    plain = _tiny_transformer_config().setup()
    torch.manual_seed(0)
    transformer = _tiny_transformer_config(
        loras=[LoRAConfig(path=str(path_a), strength=0.5)]
    ).setup()
    expected = _weights(plain.network)
    WanLoRAs(plain.network).add(path_a, strength=0.5)
    _assert_same_weights(transformer.network, _weights(plain.network))
    assert transformer.loras.names == ["a"]
    transformer.loras.clear()
    _assert_same_weights(transformer.network, expected)
    # Wan 2.2: each expert has its own list
    wan22 = Wan22TransformerConfig(
        transformer_high_noise=_tiny_transformer_config(loras=[LoRAConfig(path=str(path_a))]),
        transformer_low_noise=_tiny_transformer_config(
            loras=[LoRAConfig(path=str(path_b), fused=False)]
        ),
    ).setup()
    assert wan22.transformer_high_noise.loras.names == ["a"]
    assert wan22.transformer_low_noise.loras.names == ["b"]
    assert not wan22.transformer_low_noise.loras.is_fused("b")


def test_loras_from_the_command_line_and_back(tmp_path):
    from flashdreams.launch.cli import compose
    from flashdreams.launch.run_config import build_run_config, run_config_to_container

    path = _save(tmp_path, "style", _tensors(seed=14))
    override = (
        "pipeline.diffusion_model.transformer.loras="
        f"[{{path: {path}, strength: 0.5}},{{path: {path}, strength: -1, fused: false, name: neg}}]"
    )
    run_config = build_run_config(compose("wan-tiny-t2v", [override]))
    loras = run_config.pipeline.diffusion_model.transformer.loras
    assert loras == [
        LoRAConfig(path=str(path), strength=0.5),
        LoRAConfig(path=str(path), strength=-1.0, fused=False, name="neg"),
    ]
    again = build_run_config(run_config_to_container(run_config))
    assert again.pipeline.diffusion_model.transformer.loras == loras
    config = run_config.pipeline.diffusion_model.transformer
    torch.manual_seed(0)
    transformer = config.setup()
    torch.manual_seed(0)
    plain = dataclasses.replace(config, loras=[]).setup()
    assert transformer.loras.names == ["style", "neg"]
    assert not transformer.loras.is_fused("neg")
    # +1 fused and -1 at run time of the same file: fused together they cancel out
    transformer.loras.set_strength("style", 1.0)
    transformer.loras.fuse()
    for name, param in plain.network.state_dict().items():
        torch.testing.assert_close(transformer.network.state_dict()[name], param, rtol=0, atol=1e-6)
    transformer.loras.set_strength("neg", 0.0)
    changed = transformer.network.state_dict()["blocks.0.self_attn.qkv.weight"]
    assert (
        changed - plain.network.state_dict()["blocks.0.self_attn.qkv.weight"]
    ).abs().max() > 1e-2


class _TermCheckingGraph(CUDAGraphWrapper):
    """CPU stand-in for :class:`CUDAGraphWrapper`: a "captured" key remembers the run-time
    LoRA terms of the network (a CUDA graph replays the tensors it captured) and a replay
    under other terms fails."""

    def __init__(self, fn, network: WanDiTNetwork) -> None:
        super().__init__(fn, warmup_iters=0)
        self.network = network
        self.num_resets = 0

    def _terms(self) -> list[tuple[str, list[int]]]:
        return [
            (name, [id(term) for term in module.terms])
            for name, module in self.network.named_modules()
            if isinstance(module, LoRALinear)
        ]

    def reset(self) -> None:
        super().reset()
        self.num_resets += 1

    def __call__(self, key, *tensors, **static_kwargs):
        captured = self._graphs.setdefault(key, self._terms())
        assert captured == self._terms(), "replayed a graph captured with other LoRA terms"
        return self.fn(*tensors, **static_kwargs)


@torch.no_grad()
def test_a_change_of_runtime_adapters_drops_captured_graphs(tmp_path):
    """A swap of run-time adapters between steady-state chunks: the transformer drops
    its captured graphs (they would replay the old terms) and the next chunks equal an
    eager transformer with the same adapters."""
    path_a = _save(tmp_path, "a", _tensors(seed=15))
    path_b = _save(tmp_path, "b", _tensors(seed=16))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        config = _tiny_transformer_config(
            len_t=1, window_size_t=3, loras=[LoRAConfig(path=str(path_a), fused=False)]
        )
        models.append(config.setup().eval())
    graphed, eager = models
    graphed.executor._resolved = True
    graph = graphed.executor.graph = _TermCheckingGraph(
        graphed.executor._graph_call, graphed.network
    )
    text = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    caches = [
        model.initialize_autoregressive_cache(height=4, width=4, text_embeddings=text)
        for model in models
    ]
    generator = torch.Generator().manual_seed(1)
    for index in range(7):
        if index == 5:  # steady state since chunk 3
            assert graph.num_resets == 1 and graph._graphs  # the rollout's first capture
            for model in models:
                model.loras.replace([LoRAConfig(path=str(path_b), fused=False)])
            assert graph.num_resets == 2 and not graph._graphs
        x = torch.randn(graphed.latent_shape, generator=generator)
        for cache in caches:
            cache.start(index)
        flows = [
            model.predict_flow(x, torch.tensor(700.0), cache)
            for model, cache in zip(models, caches, strict=True)
        ]
        for model, cache in zip(models, caches, strict=True):
            model.finalize_kv_cache(x, torch.tensor(0.0), cache)
        torch.testing.assert_close(flows[0], flows[1], rtol=0, atol=1e-6)
    assert graph._graphs  # captured again under adapter b
