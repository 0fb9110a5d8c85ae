"""A ``recache`` prompt switch under context parallelism equals the single-process run.

Every rank builds the same seeded tiny Wan diffusion model (CFG, sink + a
window smaller than the rollout, ``context_noise > 0``, chunks of 5 tokens:
padded on 2 ranks), generates 3 chunks, switches the prompt and the negative
prompt with ``recache`` (each rank replays its own token shards), then
generates 3 more chunks; rank 0 compares its gathered latents with the
parent's single-process run (max abs <= 1e-5, fp32). Ring and Ulysses run in
one spawn.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan.transformer import Wan21TransformerConfig, WanDiTNetworkTinyConfig
from flashdreams.testing import run_on_ranks

TOL = 1e-5
HEIGHT, WIDTH = 2, 10  # latent; patch (1, 2, 2) -> 5 tokens per frame
NUM_BEFORE, NUM_AFTER = 3, 3
CP_METHODS = ("ring", "ulysses")


def model_config(cp_method: str) -> DiffusionModelConfig:
    transformer = Wan21TransformerConfig(
        network=WanDiTNetworkTinyConfig(dim=96, ffn_dim=128, num_heads=12, cp_method=cp_method),
        dtype=torch.float32,
        len_t=1,
        window_size_t=2,
        sink_size_t=1,
        guidance_scale=3.0,
        compile_network=False,
        use_cuda_graph=False,
    )
    return DiffusionModelConfig(
        transformer=transformer,
        scheduler=FlowMatchSchedulerConfig(num_inference_steps=2, denoising_timesteps=[1000, 500]),
        seed=1234,
        context_noise=100,
    )


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def rollout_with_switch(cp_method: str, switch: bool = True) -> list[torch.Tensor | None]:
    """Clean latents of every chunk (``None`` off CP rank 0)."""
    torch.manual_seed(0)
    model = model_config(cp_method).setup().eval()
    transformer = model.transformer
    cache = transformer.initialize_autoregressive_cache(
        height=HEIGHT,
        width=WIDTH,
        text_embeddings=_randn(1, 1, 6, 32),
        negative_text_embeddings=_randn(2, 1, 4, 32),
    )
    latents = []
    for index in range(NUM_BEFORE + NUM_AFTER):
        if switch and index == NUM_BEFORE:
            transformer.switch_conditioning(
                cache,
                recache=True,
                text_embeddings=_randn(3, 1, 5, 32),
                negative_text_embeddings=_randn(4, 1, 3, 32),
            )
        clean, final_state = model.generate(index, cache)
        model.finalize(final_state)
        latents.append(clean)
    return latents


def check_ranks(rank: int, world_size: int, reference: dict[str, list[torch.Tensor]]) -> None:
    for cp_method in CP_METHODS:
        latents = rollout_with_switch(cp_method)
        if rank != 0:
            assert all(latent is None for latent in latents)
            continue
        for index, (latent, expected) in enumerate(zip(latents, reference[cp_method], strict=True)):
            error = (latent - expected).abs().max().item()
            assert error <= TOL, f"{cp_method}, chunk {index}: max abs {error:.3e} > {TOL}"
    dist.barrier()


def test_recache_switch_on_two_ranks_equals_one_rank():
    reference = {cp_method: rollout_with_switch(cp_method) for cp_method in CP_METHODS}
    run_on_ranks(check_ranks, 2, reference)


def test_switch_changes_the_chunks_after_it():
    switched = rollout_with_switch("ring")
    plain = rollout_with_switch("ring", switch=False)
    for index in range(NUM_BEFORE):
        assert torch.equal(switched[index], plain[index])
    assert (switched[NUM_BEFORE] - plain[NUM_BEFORE]).abs().max() > 1e-3
