"""CFG-parallel Wan rollouts (one half of the ranks per CFG branch) equal batched CFG.

The parent process (no ``torch.distributed``) runs a tiny Wan T2V rollout
with batched CFG (guidance 3, negative embeddings) once; spawned gloo worlds
rerun it with a parallel plan built with ``cfg_parallel=True``:

* world 2: one rank per branch (no context parallelism inside a half);
* world 4: two halves of 2 ranks, ring and Ulysses inside each half.

Rank 0 compares its gathered latents chunk by chunk (max abs difference <=
1e-5, fp32); every other rank must return ``None``. Each rank's caches must
hold its branch only: batch 1, and the text K/V of its own prompt.

Every rollout: 4 chunks of 5 tokens (2 ranks per half need padding), a sink
+ rolling window smaller than the rollout, ``context_noise > 0`` and a
two-step self-forcing scheduler, so both halves must draw identical noise.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flashdreams.core.distributed import CFGParallelMesh, ParallelDims, build_cp_mesh
from flashdreams.core.distributed.plan import ParallelPlan, build_parallel_plan
from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan.transformer import (
    Wan21Transformer,
    Wan21TransformerConfig,
    Wan22TransformerConfig,
    WanDiTNetworkTinyConfig,
)
from flashdreams.testing import run_on_ranks

TOL = 1e-5
NUM_CHUNKS = 4
HEIGHT, WIDTH = 2, 10  # latent; patch (1, 2, 2) -> 1 x 5 = 5 tokens per frame
GUIDANCE_SCALE = 3.0


def transformer_config(
    *,
    cp_method: str = "ring",
    num_heads: int = 4,
    dim: int = 64,
    guidance_scale: float = GUIDANCE_SCALE,
) -> Wan21TransformerConfig:
    return Wan21TransformerConfig(
        network=WanDiTNetworkTinyConfig(
            dim=dim, ffn_dim=96, num_heads=num_heads, cp_method=cp_method
        ),
        dtype=torch.float32,
        len_t=1,
        window_size_t=2,
        sink_size_t=1,
        guidance_scale=guidance_scale,
        compile_network=False,
        use_cuda_graph=False,
    )


def cfg_plan(ulysses_degree: int | None = None) -> ParallelPlan:
    """The spawned world's plan: one CFG branch per half (collective)."""
    return build_parallel_plan(cfg_parallel=True, ulysses_degree=ulysses_degree)


def fake_cfg_plan() -> ParallelPlan:
    """A one-process stand-in for a 2-rank CFG-parallel plan (no groups: construction checks only)."""
    local = build_cp_mesh(ParallelDims(1))
    return ParallelPlan(
        world_size=2, cfg=CFGParallelMesh(branch_index=0, pair_group=None, cp_mesh=local)
    )


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def rollout(
    transformer: Wan21TransformerConfig, parallel: ParallelPlan | None = None
) -> tuple[list[torch.Tensor | None], object]:
    """Clean latents ``[1, 1, 16, H, W]`` of every chunk (``None`` off rank 0) and the cache."""
    torch.manual_seed(0)
    model = (
        DiffusionModelConfig(
            transformer=transformer,
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=2, denoising_timesteps=[1000, 500]
            ),
            seed=1234,
            context_noise=100,
        )
        .setup(parallel=parallel)
        .eval()
    )
    cache = model.transformer.initialize_autoregressive_cache(
        height=HEIGHT,
        width=WIDTH,
        text_embeddings=_randn(1, 1, 6, 32),
        negative_text_embeddings=_randn(2, 1, 4, 32),
    )
    latents = []
    for index in range(NUM_CHUNKS):
        clean, final_state = model.generate(index, cache)
        model.finalize(final_state)
        latents.append(clean)
    return latents, cache


def cases_for(world_size: int) -> dict[str, Wan21TransformerConfig]:
    if world_size == 2:
        return {"one-rank-per-branch": transformer_config()}
    return {
        "ring-2-per-branch": transformer_config(cp_method="ring"),
        "ulysses-2-per-branch": transformer_config(cp_method="ulysses"),
    }


def check_world(rank: int, world_size: int, reference: dict) -> None:
    half_size = world_size // 2
    branch = rank // half_size
    for name, config in cases_for(world_size).items():
        latents, cache = rollout(config, cfg_plan())
        for index, latent in enumerate(latents):
            if rank != 0:
                assert latent is None, f"{name}: rank {rank} got a latent for chunk {index}"
                continue
            want = reference["latents"][index]
            assert latent.shape == want.shape, (name, index, latent.shape, want.shape)
            err = (latent - want).abs().max().item()
            assert err <= TOL, f"{name} N={world_size} chunk {index}: max abs {err:.3e}"
        check_cache(name, cache, branch, reference)
    check_groups(rank, world_size)
    bad_configs(world_size)


def kv_bytes(network_cache) -> int:
    """Bytes of the self-attention K and V buffers of every block."""
    return sum(
        tensor.numel() * tensor.element_size()
        for block in network_cache.blocks
        for tensor in (block.self_kv.k, block.self_kv.v)
    )


def check_cache(name: str, cache, branch: int, reference: dict) -> None:
    """This rank holds its branch only: batch 1, its own prompt's text K/V; with one rank
    per branch, half the K/V bytes of batched CFG."""
    own, other = (
        (cache.network_cache, cache.network_cache_uncond)
        if branch == 0
        else (cache.network_cache_uncond, cache.network_cache)
    )
    assert other is None, f"{name}: branch {branch} holds the other branch's cache"
    assert own is cache.batched_network_cache
    assert cache.chunk_index == NUM_CHUNKS
    if dist.get_world_size() == 2:
        assert 2 * kv_bytes(own) == reference["kv_bytes"], (kv_bytes(own), reference["kv_bytes"])
    for block_index, block in enumerate(own.blocks):
        assert block.self_kv.k.shape[0] == 1, (name, tuple(block.self_kv.k.shape))
        assert block.self_kv.v.shape[0] == 1, (name, tuple(block.self_kv.v.shape))
        assert block.cross_k.shape[0] == 1 and block.cross_v.shape[0] == 1
        want_k = reference["cross_k"][block_index][branch]
        err = (block.cross_k - want_k).abs().max().item()
        assert err <= TOL, f"{name}: branch {branch} block {block_index} text keys off by {err:.3e}"


def check_groups(rank: int, world_size: int) -> None:
    """The mesh: halves as CP groups, partners ``r`` and ``r + N`` paired."""
    transformer = transformer_config().setup(parallel=cfg_plan())
    mesh = transformer.cfg_parallel_mesh
    half_size = world_size // 2
    assert mesh.branch_index == rank // half_size
    assert dist.get_process_group_ranks(mesh.pair_group) == [
        rank % half_size,
        rank % half_size + half_size,
    ]
    if half_size == 1:
        assert transformer.cp_mesh is None
        return
    first = mesh.branch_index * half_size
    assert transformer.cp_mesh.rank == rank - first
    assert transformer.cp_mesh.cp_degree == half_size
    assert dist.get_process_group_ranks(transformer.cp_mesh.cp_group) == list(
        range(first, first + half_size)
    )


def bad_configs(world_size: int) -> None:
    """Construction-time errors (all ranks raise alike: no hang)."""
    if world_size != 4:
        return
    # 3 heads cannot be split over a Ulysses group of half the world (2 ranks).
    three_heads = transformer_config(cp_method="ulysses", num_heads=3, dim=96)
    with pytest.raises(
        ValueError,
        match=r"^cfg_parallel=True: each CFG branch runs context parallel on 2 of the 4 ranks: "
        r"3 heads: Ulysses degree must be one of 1, 3; got 2 \(with world size 2 use one of 1\)$",
    ):
        three_heads.setup(parallel=cfg_plan())
    with pytest.raises(
        ValueError,
        match=r"^cfg_parallel=True: each CFG branch runs context parallel on 2 of the 4 ranks: "
        r"world size 2: ulysses_degree must be one of 1, 2; got 4$",
    ):
        cfg_plan(ulysses_degree=4)


@pytest.fixture(scope="module")
def reference() -> dict:
    assert not dist.is_initialized()
    latents, cache = rollout(transformer_config())
    cross_k = [
        (cache.network_cache.blocks[i].cross_k, cache.network_cache_uncond.blocks[i].cross_k)
        for i in range(len(cache.network_cache.blocks))
    ]
    return {
        "latents": latents,
        "cross_k": cross_k,
        "kv_bytes": kv_bytes(cache.batched_network_cache),
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_cfg_parallel_rollout_equals_batched_cfg(world_size, reference):
    run_on_ranks(check_world, world_size, reference)


def test_cfg_parallel_without_cfg_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"^cfg_parallel=True splits the ranks between the two CFG branches, but "
        r"guidance_scale=1.0 disables CFG; set guidance_scale > 1 or cfg_parallel=False$",
    ):
        Wan21Transformer(transformer_config(guidance_scale=1.0), fake_cfg_plan())


def test_cfg_parallel_on_one_process_is_rejected():
    assert not dist.is_initialized()
    with pytest.raises(
        ValueError,
        match=r"^cfg_parallel=True needs an even world size \(one half of the ranks per CFG "
        r"branch\); got world size 1$",
    ):
        build_parallel_plan(cfg_parallel=True)


def test_cfg_parallel_with_wan22_is_rejected():
    branch = transformer_config(guidance_scale=1.0)
    config = Wan22TransformerConfig(transformer_high_noise=branch, transformer_low_noise=branch)
    with pytest.raises(
        ValueError,
        match=r"^Wan22Transformer does not support CFG, so neither cfg_parallel: "
        r"set parallel.cfg_parallel=false$",
    ):
        config.setup(parallel=fake_cfg_plan())
