"""Context-parallel attention benchmark on CPU (gloo ranks spawned locally).

    python bench/bench_cp.py            # full run (~1-2 min on 2 cores)
    python bench/bench_cp.py --quick    # smaller sizes

1. Bytes each rank sends per attention layer (counted from the tensors the
   primitives actually send, via CommStats) vs the analytic minimum:
   ring: (N-1)/N of the global K+V bytes; Ulysses: 4 all-to-alls (q, k, v,
   out), each (N-1)/N of the local shard. Ulysses runs through the networks'
   context-parallel self-attention (one chunk, no cache history), which drops
   padding before attending, so it needs no mask.
2. Wall time of one attention step at CP 1 (one process) and CP 2 (ring and
   Ulysses), one thread per rank, at a token count where attention dominates.
3. Ring overlap: CP 2 ring with the next K/V shard in flight vs strictly
   serial (receive, then compute).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashdreams.core.attention.backends import attention
from flashdreams.core.attention.context_parallel import ContextParallelSelfAttention
from flashdreams.core.attention.ring import ring_attention
from flashdreams.core.distributed import (
    CommStats,
    ParallelDims,
    build_cp_mesh,
    split_tokens,
    token_valid_mask,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=300),
    )
    result = fn(rank, world_size, *args)
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see flashdreams/testing/distributed.py: skip gloo teardown


def spawn(fn, world_size, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args, queue), nprocs=world_size)
    return queue.get()


def make_inputs(num_q, num_kv, num_heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, num_q, num_heads, head_dim, generator=gen)
    k = torch.randn(1, num_kv, num_heads, head_dim, generator=gen)
    v = torch.randn(1, num_kv, num_heads, head_dim, generator=gen)
    return q, k, v


def local_inputs(rank, world_size, num_q, num_kv, num_heads, head_dim):
    q, k, v = make_inputs(num_q, num_kv, num_heads, head_dim)
    mask = token_valid_mask(num_kv, rank, world_size)[None]
    shard = [split_tokens(x, 1, rank, world_size) for x in (q, k, v)]
    return (*shard, mask)


def ulysses_step(world_size, num_tokens, num_heads, head_dim, comm_stats=None):
    """``step(q, k, v)``: one chunk of Ulysses self-attention as the networks run it."""
    mesh = build_cp_mesh(ParallelDims(world_size, ulysses_degree=world_size))
    strategy = ContextParallelSelfAttention(mesh, comm_stats=comm_stats)
    cache = strategy.make_kv_cache(
        batch_size=1,
        num_heads=num_heads,
        head_dim=head_dim,
        chunk_size=num_tokens,
        window_size=0,
        sink_size=0,
    )
    return lambda q, k, v: strategy.self_attention(q, k, v, kv_cache=cache)


def bytes_worker(rank, world_size, num_tokens, num_heads, head_dim):
    q, k, v, mask = local_inputs(rank, world_size, num_tokens, num_tokens, num_heads, head_dim)
    group = dist.group.WORLD
    element = 4
    global_kv = 2 * num_tokens * num_heads * head_dim * element
    ring_min = (world_size - 1) / world_size * global_kv
    local_shard = num_tokens / world_size * num_heads * head_dim * element  # unpadded
    ulysses_min = 4 * (world_size - 1) / world_size * local_shard
    results = {}
    for name, with_mask in (("no mask", False), ("padding mask", True)):
        ring_stats = CommStats()
        ring_attention(q, k, v, mask if with_mask else None, group, comm_stats=ring_stats)
        results[name] = dict(ring=(ring_stats.total_bytes, ring_min, dict(ring_stats.bytes_sent)))
    ulysses_stats = CommStats()
    ulysses_step(world_size, num_tokens, num_heads, head_dim, ulysses_stats)(q, k, v)
    results["no mask"]["ulysses"] = (
        ulysses_stats.total_bytes,
        ulysses_min,
        dict(ulysses_stats.bytes_sent),
    )
    return results


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        dist.barrier() if dist.is_initialized() else None
        start = time.perf_counter()
        fn()
        dist.barrier() if dist.is_initialized() else None
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing_worker(rank, world_size, num_q, num_kv, num_heads, head_dim, repeats):
    q, k, v, mask = local_inputs(rank, world_size, num_q, num_kv, num_heads, head_dim)
    group = dist.group.WORLD
    _time(lambda: ring_attention(q, k, v, mask, group), 1)  # warm-up
    times = dict(
        ring_overlap=_time(lambda: ring_attention(q, k, v, mask, group, overlap=True), repeats),
        ring_serial=_time(lambda: ring_attention(q, k, v, mask, group, overlap=False), repeats),
    )
    if num_q == num_kv:
        step = ulysses_step(world_size, num_q, num_heads, head_dim)
        times["ulysses"] = _time(lambda: step(q, k, v), repeats)
    return times


def time_single(num_q, num_kv, num_heads, head_dim, repeats):
    torch.set_num_threads(1)
    q, k, v = make_inputs(num_q, num_kv, num_heads, head_dim)
    for backend in ("sdpa", "math"):
        attention(q, k, v, backend=backend)
    return {b: _time(lambda b=b: attention(q, k, v, backend=b), repeats) for b in ("sdpa", "math")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    repeats = 3

    num_heads, head_dim = 12, 128  # Wan 1.3B attention geometry
    print(f"== bytes sent per rank per attention layer (H={num_heads}, D={head_dim}, fp32)")
    for world_size in (2, 4):
        for num_tokens in (1560, 1561):  # one Wan 480p latent frame is 1560 tokens
            results = spawn(bytes_worker, world_size, num_tokens, num_heads, head_dim)
            for case, per_method in results.items():
                for method, (sent, minimum, parts) in per_method.items():
                    print(
                        f"N={world_size} L={num_tokens} {case:12s} {method:7s} "
                        f"sent={sent} min={minimum:.0f} ratio={sent / minimum:.4f} {parts}"
                    )

    size = (2048, 2048, 4, 64) if args.quick else (4096, 4096, 4, 64)
    print(f"== one attention step, Lq=Lk={size[0]}, H={size[2]}, D={size[3]}, 1 thread/rank")
    single = time_single(*size, repeats)
    print(f"CP1 sdpa={single['sdpa']:.3f}s  CP1 math(lse)={single['math']:.3f}s")
    cp2 = spawn(timing_worker, 2, *size, repeats)
    print(
        f"CP2 ring overlap={cp2['ring_overlap']:.3f}s serial={cp2['ring_serial']:.3f}s "
        f"ulysses={cp2['ulysses']:.3f}s  speedup vs CP1 sdpa: ring "
        f"{single['sdpa'] / cp2['ring_overlap']:.2f}x, ulysses {single['sdpa'] / cp2['ulysses']:.2f}x"
    )

    comm = (256, 16384, 12, 128) if not args.quick else (128, 8192, 12, 128)
    print(f"== ring overlap, comm-heavy: Lq={comm[0]}, Lk={comm[1]}, H={comm[2]}, D={comm[3]}")
    heavy = spawn(timing_worker, 2, *comm, repeats)
    print(
        f"CP2 ring overlap={heavy['ring_overlap']:.3f}s serial={heavy['ring_serial']:.3f}s "
        f"(serial/overlap = {heavy['ring_serial'] / heavy['ring_overlap']:.2f})"
    )


if __name__ == "__main__":
    main()
