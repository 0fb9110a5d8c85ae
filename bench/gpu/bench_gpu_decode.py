"""GPU decode plans: the Wan VAE (or TAEHV) decode of one chunk on one GPU vs row slabs on N GPUs.

For ``parallel.decode=parallel``: time per steady chunk (one latent frame -> 4 frames at
480x832, bf16, random weights of the real width) and peak decoder memory per GPU, one
GPU first, then N GPUs (one NCCL rank each) in freshly spawned processes, in the same run.

Needs at least two CUDA devices; with fewer it prints a message and exits 0. ``--smoke``
runs the code path on CPU (gloo, 2 ranks, a tiny decoder).

    python bench/gpu/bench_gpu_decode.py [--gpus N] [--decoder wan21|wan22|taehv] [--record]
    python bench/gpu/bench_gpu_decode.py --smoke
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_parallel_decode import HEIGHT, WIDTH, build_decoder  # noqa: E402
from common import command_line, record  # noqa: E402


def decode_worker(rank: int, world_size: int, port: int, options: dict, queue) -> None:  # noqa: ANN001
    import torch
    import torch.distributed as dist

    from flashdreams.infra.decoder.row_parallel import RowParallelDecoder

    smoke = options["smoke"]
    device = torch.device("cpu") if smoke else torch.device("cuda", rank)
    if not smoke:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo" if smoke else "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=600),
    )
    torch.set_grad_enabled(False)
    decoder = build_decoder(options["decoder"], options["base_dim"])
    decoder = decoder.to(device=device, dtype=torch.float32 if smoke else torch.bfloat16).eval()
    ratio = decoder.spatial_compression_ratio
    config = decoder.config
    channels = config.latent_channels if options["decoder"] == "taehv" else config.z_dim
    height, width = options["height"], options["width"]
    latent = torch.randn(
        1, options["chunks"], channels, height // ratio, width // ratio,
        generator=torch.Generator().manual_seed(1),
    ).to(device)  # fmt: skip
    decode = decoder if world_size == 1 else RowParallelDecoder(decoder, None)
    cache = decode.initialize_autoregressive_cache()
    if not smoke:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for index in range(options["chunks"]):
        dist.barrier()
        start = time.perf_counter()
        decode(latent[:, index : index + 1], index, cache)
        if not smoke:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = 0 if smoke else torch.cuda.max_memory_allocated(device) - base
    peaks = [None] * world_size
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        queue.put({"times": times, "peaks": peaks})
    dist.barrier()
    dist.destroy_process_group()


def spawn(world_size: int, options: dict) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    mp.spawn(decode_worker, args=(world_size, port, options, queue), nprocs=world_size)
    return queue.get()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=None, help="N (default: all visible)")
    parser.add_argument("--decoder", choices=("wan21", "wan22", "taehv"), default="wan21")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the code path")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.smoke and num_gpus < 2:
        print(f"bench_gpu_decode: needs at least 2 CUDA devices, found {num_gpus}; skipped")
        return
    world_size = 2 if args.smoke else (args.gpus or num_gpus)
    options = {
        "smoke": args.smoke,
        "decoder": args.decoder,
        "base_dim": 2 if args.smoke else (160 if args.decoder == "wan22" else 96),
        "height": 64 if args.smoke else HEIGHT,
        "width": 64 if args.smoke else WIDTH,
        "chunks": 3 if args.smoke else args.chunks,
    }
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    single = spawn(1, options)
    parallel = spawn(world_size, options)
    single_ms = statistics.median(single["times"][1:]) * 1000
    parallel_ms = statistics.median(parallel["times"][1:]) * 1000
    lines = [
        f"Decoder {args.decoder}, {options['height']}x{options['width']}, 1 latent frame per "
        f"chunk, median of {options['chunks'] - 1} steady chunks",
        "",
        f"| | 1 {'rank' if args.smoke else 'GPU'} | {world_size} | ratio |",
        "|---|---|---|---|",
        f"| decode ms per chunk | {single_ms:.1f} | {parallel_ms:.1f} | "
        f"{single_ms / parallel_ms:.2f}x speed-up |",
        f"| peak decode memory MiB (max rank) | {single['peaks'][0] / 2**20:.0f} | "
        f"{max(parallel['peaks']) / 2**20:.0f} | "
        f"{max(parallel['peaks']) / max(single['peaks'][0], 1):.2f} |",
    ]
    print("\n".join(lines))
    if args.record and not args.smoke:
        record(
            "GPU decode plans: one GPU vs row slabs",
            command_line(),
            "\n".join(lines),
            label=args.label,
        )


if __name__ == "__main__":
    main()
