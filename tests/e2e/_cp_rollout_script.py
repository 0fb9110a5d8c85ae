"""Tiny Wan rollout for the torchrun CP test: ``python _cp_rollout_script.py OUT [cp_method]``.

Run as one process or under ``torchrun --standalone --nproc-per-node=N``; with
more than one rank the transformer detects the world at construction and runs
context-parallel. Rank 0 saves the clean latents of every chunk (stacked
``[num_chunks, 1, len_t, 16, H, W]``) and the world size to ``OUT``
(safetensors).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan.transformer import (
    I2VCtrl,
    Wan21TransformerConfig,
    WanDiTNetworkTinyConfig,
)

NUM_CHUNKS = 2
LEN_T = 2
HEIGHT, WIDTH = 2, 10  # 1 x 5 tokens per frame: 10 per chunk, 5 slots per rank on 2 ranks


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def main(out_path: str, cp_method: str) -> None:
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    transformer = Wan21TransformerConfig(
        network=WanDiTNetworkTinyConfig(cp_method=cp_method),
        dtype=torch.float32,
        len_t=LEN_T,
        window_size_t=1,
        sink_size_t=1,
        guidance_scale=2.5,
        stamp_image_latent=True,
        compile_network=False,
        use_cuda_graph=False,
    )
    model = (
        DiffusionModelConfig(
            transformer=transformer,
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=2, denoising_timesteps=[1000, 500]
            ),
            seed=42,
            context_noise=100,
        )
        .setup()
        .eval()
    )
    cache = model.transformer.initialize_autoregressive_cache(
        height=HEIGHT,
        width=WIDTH,
        text_embeddings=_randn(1, 1, 6, 32),
        negative_text_embeddings=_randn(2, 1, 6, 32),
    )
    mask = torch.zeros(1, LEN_T, 1, HEIGHT, WIDTH)
    mask[:, 0] = 1.0
    ctrl = I2VCtrl(latent=_randn(3, 1, LEN_T, 16, HEIGHT, WIDTH) * mask, mask=mask)
    latents = []
    for index in range(NUM_CHUNKS):
        clean, final_state = model.generate(index, cache, ctrl if index == 0 else None)
        model.finalize(final_state)
        latents.append(clean)
    rank = dist.get_rank() if world_size > 1 else 0
    if rank == 0:
        save_file(
            {
                "latents": torch.stack(latents).contiguous(),
                "world_size": torch.tensor(world_size),
                "cp_degree": torch.tensor(
                    0 if model.transformer.cp_mesh is None else model.transformer.cp_mesh.cp_degree
                ),
            },
            out_path,
        )
    else:
        assert all(latent is None for latent in latents), "only CP rank 0 gathers the latent"
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
        # gloo may abort during interpreter teardown on torch 2.13 CPU (see
        # flashdreams/testing/distributed.py); the work is finished and saved.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ring")
