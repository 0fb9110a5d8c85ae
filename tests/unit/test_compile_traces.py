"""The decoders' CUDA compile paths trace as whole graphs (checked on CPU).

On CUDA the Wan VAE and TAEHV decoders are ``torch.compile``d by default
(``use_cuda_graph=True``: mode ``reduce-overhead``). A graph break would split
the compiled network into many small graphs, each recompiled per shape until
dynamo's recompile limit leaves the rest eager. Here dynamo traces each network
on CPU with its ``eager`` backend and ``fullgraph=True`` (any graph break
raises), wrapped the way ``_network`` wraps it on CUDA, and a streamed rollout
must equal the uncompiled one.
"""

from __future__ import annotations

import torch

from flashdreams.recipes.taehv import TeahvVAEDecoderConfig
from flashdreams.recipes.wan.autoencoder import WanVAEDecoderConfig, WanVAEEncoderConfig

WAN_VAE_TINY = dict(
    checkpoint_path=None,
    dtype=torch.float32,
    base_dim=8,
    dim_mult=(1, 2, 2, 2),
    num_res_blocks=1,
    use_cuda_graph=False,
    z_dim=4,
    latent_mean=(0.1,) * 4,
    latent_std=(2.0,) * 4,
)


def _trace_whole(module: torch.nn.Module):
    return torch.compile(module, backend="eager", fullgraph=True, dynamic=False)


def _stream(model, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    cache = model.initialize_autoregressive_cache()
    return [model(chunk, index, cache) for index, chunk in enumerate(chunks)]


@torch.no_grad()
def test_wan_vae_decoder_traces_without_graph_breaks():
    torch.manual_seed(0)
    decoder = WanVAEDecoderConfig(**WAN_VAE_TINY).setup().eval()
    generator = torch.Generator().manual_seed(1)
    latents = list(torch.randn(3, 1, 2, 4, 4, 4, generator=generator))  # 3 chunks, 2 frames
    expected = _stream(decoder, latents)
    decoder._compile_checked = True  # what _network does on CUDA, with dynamo's eager backend
    decoder._compiled = _trace_whole(decoder.decoder)
    for traced, eager in zip(_stream(decoder, latents), expected, strict=True):
        torch.testing.assert_close(traced, eager, rtol=0, atol=1e-5)


@torch.no_grad()
def test_wan_vae_encoder_traces_without_graph_breaks():
    torch.manual_seed(0)
    encoder = WanVAEEncoderConfig(**WAN_VAE_TINY).setup().eval()
    generator = torch.Generator().manual_seed(1)
    frames = torch.rand(1, 9, 3, 32, 32, generator=generator) * 2 - 1
    chunks = [frames[:, :1], frames[:, 1:5], frames[:, 5:9]]  # 1 + 4k frames, then 4k
    expected = _stream(encoder, chunks)
    encoder._compile_checked = True
    encoder._compiled = _trace_whole(encoder.encoder)
    for traced, eager in zip(_stream(encoder, chunks), expected, strict=True):
        torch.testing.assert_close(traced, eager, rtol=0, atol=1e-5)


@torch.no_grad()
def test_taehv_traces_without_graph_breaks():
    torch.manual_seed(0)
    decoder = (
        TeahvVAEDecoderConfig(
            checkpoint_path=None,
            dtype=torch.float32,
            use_compile=False,
            use_cuda_graph=False,
            latent_channels=4,
            decoder_channels=(8, 8, 6, 4),
        )
        .setup()
        .eval()
    )
    generator = torch.Generator().manual_seed(1)
    latents = list(torch.randn(3, 1, 2, 4, 3, 4, generator=generator))
    expected = _stream(decoder, latents)
    decoder._compile_checked = True
    decoder._compiled_network = _trace_whole(decoder.decoder)
    for traced, eager in zip(_stream(decoder, latents), expected, strict=True):
        torch.testing.assert_close(traced, eager, rtol=0, atol=1e-5)
