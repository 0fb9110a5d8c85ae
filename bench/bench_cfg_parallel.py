"""CFG on 2 ranks: batched CFG with CP 2 vs cfg_parallel (one rank per branch), on CPU.

Both modes run one guided denoising step (``predict_flow``, guidance 3) of a
chunk whose KV cache already holds one earlier chunk, on two spawned gloo
ranks with one thread each:

* ``batched``: every rank runs ``[cond; uncond]`` (batch 2) on half of the
  tokens, ring attention over the two ranks (K/V shards cross every layer);
* ``cfg_parallel``: rank 0 runs the conditional branch, rank 1 the
  unconditional one (batch 1, all tokens, no attention traffic); one
  all-gather of the predicted flow per step.

The arithmetic per rank is the same in both modes; what differs is the
traffic and the per-rank text K/V (both prompts vs one). Median of
``NUM_REPEATS`` timed steps after one warm-up step, slowest rank.

    python bench/bench_cfg_parallel.py
"""

from __future__ import annotations

import statistics
import time

import torch

from flashdreams.core.distributed.plan import build_parallel_plan
from flashdreams.recipes.wan import Wan21TransformerConfig, WanDiTNetworkConfig  # noqa: E402
from flashdreams.testing import run_on_ranks

NUM_FRAMES, LATENT_HEIGHT, LATENT_WIDTH = 3, 30, 52
TEXT_LEN, TEXT_DIM = 32, 64
NUM_REPEATS = 5


def _config() -> Wan21TransformerConfig:
    return Wan21TransformerConfig(
        network=WanDiTNetworkConfig(
            dim=256,
            ffn_dim=512,
            freq_dim=64,
            text_dim=TEXT_DIM,
            text_len=TEXT_LEN,
            num_heads=4,
            num_layers=2,
            cp_method="ring",
        ),
        dtype=torch.float32,
        checkpoint_path=None,
        len_t=NUM_FRAMES,
        window_size_t=NUM_FRAMES,
        guidance_scale=3.0,
        compile_network=False,
        use_cuda_graph=False,
    )


def _cache_bytes(network_cache) -> tuple[int, int]:
    """(self-attention K/V bytes, text K/V bytes) held by this rank."""

    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    self_kv = sum(nbytes(b.self_kv.k) + nbytes(b.self_kv.v) for b in network_cache.blocks)
    text_kv = sum(nbytes(b.cross_k) + nbytes(b.cross_v) for b in network_cache.blocks)
    return self_kv, text_kv


def _time_step(cfg_parallel: bool) -> tuple[float, int, int]:
    torch.manual_seed(0)
    plan = build_parallel_plan(cfg_parallel=cfg_parallel)
    transformer = _config().setup(parallel=plan).eval()
    text = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    negative = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(2))
    cache = transformer.initialize_autoregressive_cache(
        height=LATENT_HEIGHT,
        width=LATENT_WIDTH,
        text_embeddings=text,
        negative_text_embeddings=negative,
    )
    rng = torch.Generator().manual_seed(3)
    cpu = torch.device("cpu")
    times = []
    with torch.no_grad():
        # Fill the KV cache with one chunk, then time steps of the next one.
        cache.start(0)
        first = transformer.sample_noise(rng, device=cpu, dtype=torch.float32)
        transformer.finalize_kv_cache(first, torch.tensor(0.0), cache)
        cache.start(1)
        noise = transformer.sample_noise(rng, device=cpu, dtype=torch.float32)
        timestep = torch.tensor(900.0)
        for repeat in range(NUM_REPEATS + 1):
            start = time.perf_counter()
            transformer.predict_flow(noise, timestep, cache)
            if repeat:
                times.append(time.perf_counter() - start)
    self_kv, text_kv = _cache_bytes(cache.batched_network_cache)
    return statistics.median(times), self_kv, text_kv


def _rank_main(rank: int, world_size: int, cfg_parallel: bool, results) -> None:
    import torch.distributed as dist

    seconds, self_kv, text_kv = _time_step(cfg_parallel)
    elapsed = torch.tensor([seconds])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.put((float(elapsed), self_kv, text_kv))


def main() -> None:
    import torch.multiprocessing as mp

    num_tokens = NUM_FRAMES * (LATENT_HEIGHT // 2) * (LATENT_WIDTH // 2)
    print(
        f"== one CFG step (guidance 3), {num_tokens} tokens + {num_tokens} cached, dim 256, "
        "4 heads, 2 layers, fp32 CPU, 2 gloo ranks x 1 thread"
    )
    queue = mp.get_context("spawn").Queue()
    results = {}
    for name, cfg_parallel in (("batched CFG, CP 2 ring", False), ("cfg_parallel", True)):
        run_on_ranks(_rank_main, 2, cfg_parallel, queue, num_threads=1)
        results[name] = queue.get()
    mib = float(1 << 20)
    for name, (seconds, self_kv, text_kv) in results.items():
        print(
            f"{name:24s} {seconds:.3f}s per step | rank 0 holds self K/V {self_kv / mib:.2f} MiB, "
            f"text K/V {text_kv / mib:.3f} MiB"
        )
    batched = results["batched CFG, CP 2 ring"][0]
    parallel = results["cfg_parallel"][0]
    print(f"ratio batched / cfg_parallel: {batched / parallel:.2f}x")


if __name__ == "__main__":
    main()
