"""Weight quantisation (transformer config ``quantization``): bytes, error bounds, errors.

Error bounds, from measurement (seeded random weights, CPU fp32 reference):

* tiny DiT, 3-chunk rollout (2 denoising steps + commit per chunk): relative error of the
  clean latents measured 5.2e-4; bound 2e-3;
* mid-size DiT (dim 512, 8 heads, 4 layers, FFN 2048, text 512 x 4096), one forward:
  measured 5.3e-4; bound 2e-3.

Per-channel symmetric int8 rounds each weight by at most half a step of ``amax / 127``;
for Gaussian-like rows the error is ~0.3% of a weight's scale, and it averages down over
a dot product, so a few 1e-4 is the expected size; 2e-3 leaves a 4x margin while a broken
scale (error ~1) or a wrong channel order fails it.
"""

from __future__ import annotations

import pytest
import torch
from test_wan_transformer import _config

from flashdreams.core.quantization import (
    check_quantization_mode,
    import_transformer_engine,
    parameter_bytes,
    quantize_linear_weights,
)
from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan.transformer import (
    Wan21TransformerConfig,
    Wan22TransformerConfig,
    WanDiTNetworkConfig,
    WanDiTNetworkTinyConfig,
)

MID_SIZE = dict(dim=512, num_heads=8, num_layers=4, ffn_dim=2048, freq_dim=256, text_dim=4096)


def _transformer_config(network=None, **overrides) -> Wan21TransformerConfig:
    return _config(network=network or WanDiTNetworkTinyConfig(), **overrides)


def tiny_rollout(num_chunks: int = 3, **overrides) -> tuple[torch.Tensor, object]:
    """Clean latents of a seeded tiny-DiT rollout (2 steps + commit per chunk) and its cache."""
    torch.manual_seed(0)
    model = (
        DiffusionModelConfig(
            transformer=_transformer_config(**overrides),
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=2, denoising_timesteps=[1000, 500]
            ),
            seed=0,
        )
        .setup()
        .eval()
    )
    text = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    cache = model.transformer.initialize_autoregressive_cache(
        height=4, width=4, text_embeddings=text
    )
    chunks = []
    for index in range(num_chunks):
        clean, final_state = model.generate(index, cache)
        model.finalize(final_state)
        chunks.append(clean)
    return torch.cat(chunks), cache


def _relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual.float() - reference.float()).norm() / reference.float().norm()).item()


def test_int8_tiny_rollout_error_and_bytes():
    reference, _ = tiny_rollout()
    quantized, _ = tiny_rollout(quantization="int8_weight_only")
    error = _relative_error(quantized, reference)
    print(f"tiny DiT int8_weight_only rollout relative error {error:.2e}")
    assert 0 < error <= 2e-3


def test_int8_mid_size_forward_error_and_weight_bytes():
    network = WanDiTNetworkConfig(text_len=64, **MID_SIZE)
    torch.manual_seed(0)
    reference = _transformer_config(network).setup().eval()
    torch.manual_seed(0)
    quantized = _transformer_config(network, quantization="int8_weight_only").setup().eval()
    assert quantized.quantization == "int8_weight_only"
    block_bytes = parameter_bytes(reference.network.blocks)
    block_ratio = parameter_bytes(quantized.network.blocks) / block_bytes
    # int8 weights + one fp32 scale per output row, biases and norms kept in fp32.
    assert 0.24 < block_ratio < 0.27, block_ratio
    assert parameter_bytes(quantized.network) < parameter_bytes(reference.network)
    text = torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(1))
    outputs = []
    for transformer in (reference, quantized):
        cache = transformer.initialize_autoregressive_cache(height=8, width=8, text_embeddings=text)
        latent = torch.randn(transformer.latent_shape, generator=torch.Generator().manual_seed(2))
        outputs.append(transformer.predict_flow(latent, torch.tensor(700.0), cache))
    error = _relative_error(outputs[1], outputs[0])
    print(
        f"mid-size DiT int8_weight_only block bytes {block_ratio:.3f}x, forward error {error:.2e}"
    )
    assert 0 < error <= 2e-3


def test_wan22_quantizes_both_experts():
    expert = _transformer_config()
    transformer = Wan22TransformerConfig(
        transformer_high_noise=expert,
        transformer_low_noise=_transformer_config(),
        quantization="int8_weight_only",
    ).setup()
    for branch in (transformer.transformer_high_noise, transformer.transformer_low_noise):
        assert branch.quantization == "int8_weight_only"
        weight = branch.network.blocks[0].ffn[0].weight
        assert type(weight).__name__ == "Int8Tensor"
    with pytest.raises(ValueError, match="disagrees with transformer_low_noise.quantization"):
        Wan22TransformerConfig(
            transformer_high_noise=_transformer_config(),
            transformer_low_noise=_transformer_config(quantization="fp8"),
            quantization="int8_weight_only",
        )


def test_bad_mode_is_a_value_error():
    with pytest.raises(
        ValueError,
        match="quantization must be one of none, int8_weight_only, fp8, te_fp8; got 'int4'",
    ):
        _transformer_config(quantization="int4")
    check_quantization_mode("none")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without fp8")
def test_fp8_without_hardware_names_the_alternative():
    with pytest.raises(ValueError) as raised:
        _transformer_config(quantization="fp8").setup()
    assert str(raised.value) == (
        "quantization=fp8 cannot run here: no CUDA device is available; use "
        "quantization=int8_weight_only (CPU and GPU) or none"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_te_fp8_without_cuda_is_one_line():
    with pytest.raises(ImportError) as raised:
        quantize_linear_weights(torch.nn.Sequential(torch.nn.Linear(16, 16)), "te_fp8")
    message = str(raised.value)
    assert "\n" not in message
    assert message == (
        "transformer-engine needs a CUDA GPU and none is available; use another mode "
        "(quantization=int8_weight_only, attention backend sdpa)"
    )


def test_te_missing_package_is_one_line(monkeypatch):
    import sys

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(ImportError) as raised:
        import_transformer_engine()
    assert str(raised.value) == (
        "transformer-engine is not installed; install the GPU extra: "
        "pip install -e '.[gpu]' (or pip install transformer-engine[pytorch])"
    )


def test_te_attention_backend_is_registered_with_its_constraints():
    import dataclasses

    from flashdreams.core.attention.backends import attention, get_attention_backend

    backend = get_attention_backend("te_fused")
    assert backend.device_types == ("cuda",) and not backend.supports_mask
    assert not backend.returns_lse
    q = torch.zeros(1, 2, 1, 8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="attention backend 'te_fused' runs on cuda, not cpu"):
            attention(q, q, q, None, backend="te_fused")
    if backend.is_available():
        return
    # Without transformer-engine: one line saying what to install.
    on_cpu = dataclasses.replace(backend, device_types=("cpu",), dtypes=(torch.float32,))
    assert on_cpu.unsupported_reason(q, need_lse=False, need_mask=False) == (
        "is not installed (pip install -e '.[gpu]' (transformer-engine[pytorch]) on a CUDA machine)"
    )


def test_loras_are_folded_in_before_quantising_then_frozen(tmp_path):
    """A fused LoRA lands in the weights that get quantised; afterwards the adapter set is
    fixed (its saved originals no longer match the quantised weights), and a run-time LoRA
    with a quantised network is refused when the config is built."""
    from safetensors.torch import save_file

    from flashdreams.recipes.wan.lora import LoRAConfig

    network = WanDiTNetworkTinyConfig()
    generator = torch.Generator().manual_seed(5)
    key = "diffusion_model.blocks.0.ffn.0"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(2, network.dim, generator=generator),
        f"{key}.lora_up.weight": torch.randn(network.ffn_dim, 2, generator=generator),
    }
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path))
    lora = LoRAConfig(path=str(path))

    def ffn_weight(**overrides) -> tuple[torch.Tensor, object]:
        torch.manual_seed(0)
        transformer = _transformer_config(**overrides).setup()
        weight = transformer.network.blocks[0].ffn[0].weight
        return (weight.dequantize() if hasattr(weight, "dequantize") else weight), transformer

    fused_fp32, _ = ffn_weight(loras=[lora])
    plain_int8, _ = ffn_weight(quantization="int8_weight_only")
    lora_int8, transformer = ffn_weight(quantization="int8_weight_only", loras=[lora])
    assert _relative_error(lora_int8, fused_fp32) <= 1e-2  # int8 rounding only
    assert _relative_error(plain_int8, fused_fp32) > 0.5  # the LoRA delta is there
    with pytest.raises(ValueError) as raised:
        transformer.loras.set_strength("a", 0.5)
    assert str(raised.value) == (
        "the LoRA adapters cannot change: the network's block weights are quantised "
        "(quantization=int8_weight_only); give the adapters in transformer.loras (fused: "
        "folded in before quantising) or use quantization=none"
    )
    runtime = LoRAConfig(path=str(path), fused=False)
    with pytest.raises(ValueError) as raised:
        _transformer_config(quantization="int8_weight_only", loras=[runtime])
    assert str(raised.value) == (
        "loras a run at run time (fused=false), which does not compose with "
        "quantization=int8_weight_only: set fused=true (folded into the weights before "
        "quantising) or quantization=none"
    )
    with pytest.raises(ValueError, match=r"^transformer_low_noise\.loras a run at run time"):
        Wan22TransformerConfig(
            transformer_high_noise=_transformer_config(),
            transformer_low_noise=_transformer_config(loras=[runtime]),
            quantization="int8_weight_only",
        )
