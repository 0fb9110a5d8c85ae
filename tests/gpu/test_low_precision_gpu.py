"""Low-precision tier on CUDA (skipped without a GPU; fp8 needs compute capability >= 8.9,
transformer-engine needs the ``[gpu]`` extra): fp8 / int8 / TE fp8 weights and the TE
attention backend against the bf16 reference, quantised KV caches in a CUDA-graph rollout.

Bounds are first estimates (fp8 e4m3 keeps 3 mantissa bits, ~2-4% per element, averaged
down in the dot products); tighten them with the first GPU measurement.
"""

from __future__ import annotations

import pytest
import torch

from flashdreams.core.quantization import fp8_support_problem, parameter_bytes
from flashdreams.recipes.wan import Wan21TransformerConfig, WanDiTNetworkConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MID_SIZE = WanDiTNetworkConfig(
    dim=512, num_heads=8, num_layers=4, ffn_dim=2048, freq_dim=256, text_dim=4096, text_len=64
)


def _needs_fp8() -> None:
    problem = fp8_support_problem()
    if problem is not None:
        pytest.skip(problem)


def _needs_te() -> None:
    from importlib.util import find_spec

    if find_spec("transformer_engine") is None:
        pytest.skip("transformer-engine is not installed (pip install -e '.[gpu]')")


def _forward(**overrides) -> tuple[torch.Tensor, object]:
    """One bf16 mid-size DiT forward on CUDA with one committed chunk in the cache."""
    torch.manual_seed(0)
    config = Wan21TransformerConfig(
        network=MID_SIZE,
        dtype=torch.bfloat16,
        len_t=2,
        window_size_t=4,
        compile_network=False,
        use_cuda_graph=False,
        **overrides,
    )
    transformer = config.setup().to("cuda").eval()
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(1, 16, 4096, generator=generator).to("cuda", torch.bfloat16)
    cache = transformer.initialize_autoregressive_cache(height=8, width=8, text_embeddings=text)
    latent = torch.randn(transformer.latent_shape, generator=generator).to("cuda")
    with torch.no_grad():
        transformer.finalize_kv_cache(latent, torch.tensor(0.0), cache)
        out = transformer.predict_flow(latent, torch.tensor(700.0), cache)
    return out.float(), transformer


def _relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize(
    ("overrides", "bound", "needs"),
    [
        ({"quantization": "int8_weight_only"}, 1e-2, None),
        ({"quantization": "fp8"}, 8e-2, _needs_fp8),
        ({"quantization": "te_fp8"}, 8e-2, _needs_te),
        ({"kv_cache_dtype": "fp8_e4m3"}, 2e-2, None),
        ({"kv_cache_dtype": "int8"}, 1e-2, None),
    ],
)
def test_low_precision_modes_vs_bf16(overrides, bound, needs):
    if needs is not None:
        needs()
    reference, reference_transformer = _forward()
    out, transformer = _forward(**overrides)
    error = _relative_error(out, reference)
    print(f"{overrides}: relative error vs bf16 {error:.2e}")
    assert torch.isfinite(out).all() and 0 < error <= bound
    if "quantization" in overrides and overrides["quantization"] != "te_fp8":
        ratio = parameter_bytes(transformer.network.blocks) / parameter_bytes(
            reference_transformer.network.blocks
        )
        assert ratio < 0.55, ratio  # 1-byte weights vs bf16, plus scales


def test_te_fused_attention_matches_sdpa():
    _needs_te()
    from flashdreams.core.attention.backends import attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 64, 4, 64, generator=generator).to("cuda", torch.bfloat16) for _ in range(3)
    )
    out = attention(q, k, v, None, backend="te_fused").float()
    reference = attention(q, k, v, None, backend="sdpa").float()
    assert _relative_error(out, reference) < 1e-2


def test_quantized_kv_cache_under_cuda_graphs():
    """fp8 cache + CUDA graphs (the GPU default) == the eager fp8-cache rollout."""
    from flashdreams.infra.diffusion.model import DiffusionModelConfig
    from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
    from flashdreams.recipes.wan import WanDiTNetworkTinyConfig

    def rollout(use_cuda_graph: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = (
            DiffusionModelConfig(
                transformer=Wan21TransformerConfig(
                    network=WanDiTNetworkTinyConfig(),
                    dtype=torch.float32,
                    len_t=1,
                    window_size_t=2,
                    use_cuda_graph=use_cuda_graph,
                    compile_network=False,
                    kv_cache_dtype="fp8_e4m3",
                ),
                scheduler=FlowMatchSchedulerConfig(),
                seed=0,
            )
            .setup()
            .to("cuda")
        )
        text = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1)).to("cuda")
        cache = model.transformer.initialize_autoregressive_cache(
            height=4, width=4, text_embeddings=text
        )
        chunks = []
        for index in range(6):
            clean, final_state = model.generate(index, cache)
            model.finalize(final_state)
            chunks.append(clean)
        return torch.cat(chunks)

    assert torch.allclose(rollout(True), rollout(False), atol=1e-5, rtol=0)
