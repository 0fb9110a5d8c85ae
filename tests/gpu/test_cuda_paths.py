"""CUDA-only checks (skipped without a GPU): CUDA graphs and compile match eager on the tiny Wan DiT."""

from __future__ import annotations

import pytest
import torch

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan import Wan21TransformerConfig, WanDiTNetworkTinyConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rollout(*, use_cuda_graph: bool, compile_network: bool, num_chunks: int = 5):
    torch.manual_seed(0)
    model = (
        DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=WanDiTNetworkTinyConfig(),
                dtype=torch.float32,
                checkpoint_path=None,
                len_t=1,
                window_size_t=2,
                use_cuda_graph=use_cuda_graph,
                compile_network=compile_network,
            ),
            scheduler=FlowMatchSchedulerConfig(),
            seed=0,
        )
        .setup()
        .to("cuda")
    )
    text = torch.randn(1, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    cache = model.transformer.initialize_autoregressive_cache(
        height=4, width=4, text_embeddings=text
    )
    outputs = []
    for index in range(num_chunks):
        clean, final_state = model.generate(index, cache)
        outputs.append(clean.clone())
        model.finalize(final_state)
    return outputs


def test_cuda_graph_matches_eager_through_steady_state():
    eager = _rollout(use_cuda_graph=False, compile_network=False)
    graphed = _rollout(use_cuda_graph=True, compile_network=False)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_matches_eager():
    eager = _rollout(use_cuda_graph=False, compile_network=False, num_chunks=3)
    compiled = _rollout(use_cuda_graph=False, compile_network=True, num_chunks=3)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_compile_and_cuda_graph_together_match_eager_while_the_window_fills():
    """The CUDA defaults (compile_network and use_cuda_graph both on), over more chunks
    than the window holds: compiled blocks must not recompile per KV length."""
    eager = _rollout(use_cuda_graph=False, compile_network=False, num_chunks=6)
    default = _rollout(use_cuda_graph=True, compile_network=True, num_chunks=6)
    for a, b in zip(eager, default):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_default_decoders_match_eager_on_cuda():
    """Wan VAE decoder and TAEHV with their defaults (use_cuda_graph=True: compiled with
    CUDA-graph replay) stream the same video as eager."""
    from flashdreams.recipes.taehv import TeahvVAEDecoderConfig
    from flashdreams.recipes.wan import WanVAEDecoderConfig

    generator = torch.Generator("cuda").manual_seed(2)
    cases = [
        (
            WanVAEDecoderConfig,
            dict(checkpoint_path=None, dtype=torch.float32, base_dim=8),
            torch.randn(3, 1, 2, 16, 8, 8, device="cuda", generator=generator),
        ),
        (
            TeahvVAEDecoderConfig,
            dict(checkpoint_path=None, dtype=torch.float32),
            torch.randn(3, 1, 2, 16, 8, 8, device="cuda", generator=generator),
        ),
    ]
    for config_class, fields, latents in cases:
        torch.manual_seed(0)
        default = config_class(**fields).setup().to("cuda").eval()
        torch.manual_seed(0)
        eager = config_class(**fields, use_cuda_graph=False, use_compile=False).setup()
        eager = eager.to("cuda").eval()
        caches = [
            default.initialize_autoregressive_cache(),
            eager.initialize_autoregressive_cache(),
        ]
        for index, latent in enumerate(latents):
            got = default(latent, index, caches[0])
            want = eager(latent, index, caches[1])
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
