"""One Wan denoising step (a full DiT forward) at CP 1 vs CP 2 on CPU, ring and Ulysses.

Attention-dominated size: one chunk of 3 latent frames at 60x104 latent (4,680 tokens),
dim 256, 4 heads, 2 layers. CP 2 runs two spawned gloo ranks with one thread each; CP 1
runs in this process with 1 thread (same per-rank budget) and with 2 threads (same
machine budget). Median of 3 timed steps after one warm-up step.

    python bench/bench_cp_step.py
"""

from __future__ import annotations

import statistics
import time

import torch

from flashdreams.recipes.wan import Wan21TransformerConfig, WanDiTNetworkConfig
from flashdreams.testing import run_on_ranks

NUM_FRAMES, LATENT_HEIGHT, LATENT_WIDTH = 3, 60, 104
NUM_REPEATS = 3


def _config(cp_method: str) -> Wan21TransformerConfig:
    return Wan21TransformerConfig(
        network=WanDiTNetworkConfig(
            dim=256,
            ffn_dim=512,
            freq_dim=64,
            text_dim=64,
            text_len=32,
            num_heads=4,
            num_layers=2,
            cp_method=cp_method,
        ),
        dtype=torch.float32,
        checkpoint_path=None,
        len_t=NUM_FRAMES,
        window_size_t=NUM_FRAMES,
        compile_network=False,
        use_cuda_graph=False,
    )


def _time_step(cp_method: str) -> float:
    torch.manual_seed(0)
    transformer = _config(cp_method).setup().eval()
    text = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(1))
    cache = transformer.initialize_autoregressive_cache(
        height=LATENT_HEIGHT, width=LATENT_WIDTH, text_embeddings=text
    )
    noise = transformer.sample_noise(
        torch.Generator().manual_seed(2), device=torch.device("cpu"), dtype=torch.float32
    )
    timestep = torch.tensor(900.0)
    times = []
    with torch.no_grad():
        cache.start(0)
        for repeat in range(NUM_REPEATS + 1):
            start = time.perf_counter()
            transformer.predict_flow(noise, timestep, cache)
            if repeat:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank_main(rank: int, world_size: int, cp_method: str, results) -> None:
    import torch.distributed as dist

    elapsed = torch.tensor([_time_step(cp_method)])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.put(float(elapsed))


def main() -> None:
    import torch.multiprocessing as mp

    num_tokens = NUM_FRAMES * (LATENT_HEIGHT // 2) * (LATENT_WIDTH // 2)
    print(f"== one denoising step, {num_tokens} tokens, dim 256, 4 heads, 2 layers, fp32 CPU")
    torch.set_num_threads(1)
    cp1_one_thread = _time_step("ring")
    torch.set_num_threads(2)
    cp1_two_threads = _time_step("ring")
    results = {}
    queue = mp.get_context("spawn").Queue()
    for method in ("ring", "ulysses"):
        run_on_ranks(_rank_main, 2, method, queue, num_threads=1)
        results[method] = queue.get()
    print(f"CP1 1 thread {cp1_one_thread:.3f}s  CP1 2 threads {cp1_two_threads:.3f}s")
    for method, seconds in results.items():
        print(
            f"CP2 {method:8s} {seconds:.3f}s  speedup vs CP1 1 thread {cp1_one_thread / seconds:.2f}x, "
            f"vs CP1 2 threads {cp1_two_threads / seconds:.2f}x"
        )


if __name__ == "__main__":
    main()
