"""Parallel (row-slab) decode vs one-rank decode on CPU: time per chunk, halo bytes, peak memory.

Every number comes from one run: the one-rank decode and the N-rank decode of the
same latent chunks (same seeded weights) run one after the other, each in freshly
spawned gloo processes with one thread per rank.

- time per steady chunk (one latent frame -> 4 pixel frames), median over the chunks
  after the first; the N-rank time is rank 0's, gather of the pixels included;
- halo bytes rank 0 sent at every convolution vs the analytic halo (halo rows x
  channels x frames x width x bytes per neighbour, from the input shapes the
  one-rank decode saw at the same convolution): a ratio of 1.0 per layer means no
  cached frame or extra row is ever re-sent;
- peak decode memory per rank: peak RSS during the decode minus RSS just before it
  (allocations above 1 MiB mapped and unmapped one by one, ``MALLOC_MMAP_THRESHOLD_``, so
  the RSS peak is the peak of live tensors in both runs).

Size: 480x832 pixels (latent 60x104), the Wan 2.1 decoder layout at a reduced width
(``--base-dim``, 16 by default; the real VAE's 96 takes minutes per chunk on one CPU
thread).

    python bench/bench_parallel_decode.py [--world-size 2] [--decoder wan21|wan22|taehv]
        [--base-dim 16] [--chunks 3] [--record]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cp import spawn  # noqa: E402  (gloo ranks, 1 thread each; rank 0's result)
from common import add_common_arguments, command_line, record  # noqa: E402

HEIGHT, WIDTH = 480, 832


def build_decoder(kind: str, base_dim: int):
    import torch

    torch.manual_seed(0)
    if kind == "taehv":
        from flashdreams.recipes.taehv import TeahvVAEDecoderConfig

        width = 4 * base_dim
        return TeahvVAEDecoderConfig(
            checkpoint_path=None,
            dtype=torch.float32,
            use_compile=False,
            use_cuda_graph=False,
            decoder_channels=(width, width // 2, width // 4, width // 4),
        ).setup()
    from flashdreams.recipes.wan.autoencoder import (
        Wan22TI2V5BVAEDecoderConfig,
        WanVAEDecoderConfig,
    )

    if kind == "wan22":
        return Wan22TI2V5BVAEDecoderConfig(
            checkpoint_path=None,
            dtype=torch.float32,
            base_dim=base_dim,
            decoder_base_dim=base_dim * 8 // 5,
        ).setup()
    return WanVAEDecoderConfig(checkpoint_path=None, dtype=torch.float32, base_dim=base_dim).setup()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _conv_halo_hooks(decoder, shapes: list[tuple[tuple[int, ...], int]]) -> None:
    """Record (input shape, halo rows) of every convolution that pads rows, in call order."""
    import torch.nn as nn

    for module in decoder.modules():
        num_rows = getattr(module, "num_halo_rows", None)
        if num_rows is None and isinstance(module, nn.Conv2d):
            num_rows = module.padding[0]
        if num_rows:
            module.register_forward_hook(
                lambda _m, inputs, _o, rows=num_rows: shapes.append((tuple(inputs[0].shape), rows))
            )


def decode_worker(rank: int, world_size: int, kind: str, base_dim: int, num_chunks: int):
    import torch
    import torch.distributed as dist

    from flashdreams.core.distributed import CommStats
    from flashdreams.infra.decoder.row_parallel import RowParallelDecoder

    torch.set_grad_enabled(False)
    decoder = build_decoder(kind, base_dim).eval()
    ratio = decoder.spatial_compression_ratio
    channels = decoder.config.latent_channels if kind == "taehv" else decoder.config.z_dim
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(
        1, num_chunks, channels, HEIGHT // ratio, WIDTH // ratio, generator=generator
    )
    halo_log: list = []
    comm_stats = CommStats()
    conv_shapes: list[tuple[tuple[int, ...], int]] = []
    if world_size == 1:
        _conv_halo_hooks(decoder, conv_shapes)
        decode = decoder
    else:
        decode = RowParallelDecoder(decoder, None, comm_stats=comm_stats, halo_log=halo_log)
    cache = decode.initialize_autoregressive_cache()
    rss_before = _rss_bytes()
    times, halo_per_chunk, convs_per_chunk = [], [], []
    for index in range(num_chunks):
        dist.barrier()
        halo_log.clear()
        conv_shapes.clear()
        start = time.perf_counter()
        video = decode(latent[:, index : index + 1], index, cache)
        times.append(time.perf_counter() - start)
        halo_per_chunk.append(list(halo_log))
        convs_per_chunk.append(list(conv_shapes))
        del video
    peak_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    peaks = [None] * world_size
    dist.all_gather_object(peaks, peak_delta)
    return {
        "times": times,
        "peak_delta": peaks,
        "halo": [(r.shape, r.num_rows, r.bytes_sent) for r in halo_per_chunk[-1]],
        "conv_shapes": convs_per_chunk[-1],
        "bytes": dict(comm_stats.bytes_sent),
    }


def analytic_halo_bytes(shape: tuple[int, ...], num_rows: int, num_neighbours: int) -> int:
    """Bytes one rank sends for a conv whose whole-frame input is ``shape`` ([..., H, W], fp32)."""
    per_row = 4 * shape[-1]
    for size in shape[:-2]:
        per_row *= size
    return num_neighbours * num_rows * per_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--decoder", choices=("wan21", "wan22", "taehv"), default="wan21")
    parser.add_argument("--base-dim", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=3, help="latent frames, one per chunk")
    args = parser.parse_args()
    if args.chunks < 2:
        raise ValueError("--chunks must be >= 2 (the first chunk is not timed)")
    n = args.world_size
    # Every allocation above 1 MiB gets its own mapping, returned on free (glibc would
    # otherwise keep freed slab-sized blocks in its heap and count them in the RSS peak).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    worker_args = (args.decoder, args.base_dim, args.chunks)
    single = spawn(decode_worker, 1, *worker_args)
    parallel = spawn(decode_worker, n, *worker_args)

    single_s = statistics.median(single["times"][1:])
    parallel_s = statistics.median(parallel["times"][1:])
    lines = [
        f"Decoder: {args.decoder}, base dim {args.base_dim}, {HEIGHT}x{WIDTH} pixels, "
        f"{args.chunks} chunks of one latent frame, fp32, 1 thread per rank",
        "",
        "| | one rank | " + f"{n} ranks | ratio |",
        "|---|---|---|---|",
        f"| decode s per steady chunk (median) | {single_s:.2f} | {parallel_s:.2f} | "
        f"{parallel_s / single_s:.2f}x time, {single_s / parallel_s:.2f}x speed-up |",
    ]
    single_peak = single["peak_delta"][0]
    for rank, peak in enumerate(parallel["peak_delta"]):
        lines.append(
            f"| peak decode memory, rank {rank} (MiB) | {single_peak / 2**20:.0f} | "
            f"{peak / 2**20:.0f} | {peak / single_peak:.2f} |"
        )
    # Per convolution: what rank 0 sent vs the analytic halo of the same conv.
    halo, convs = parallel["halo"], single["conv_shapes"]
    assert len(halo) == len(convs), (len(halo), len(convs))
    groups: dict[tuple, list[float]] = {}
    total_sent = total_analytic = 0
    for (_slab_shape, rows, sent), (full_shape, full_rows) in zip(halo, convs):
        assert rows == full_rows
        analytic = analytic_halo_bytes(full_shape, rows, num_neighbours=1)
        total_sent += sent
        total_analytic += analytic
        key = (full_shape, rows, sent, analytic)
        groups.setdefault(key, []).append(sent / analytic)
    lines += [
        "",
        f"Halo bytes rank 0 sent per convolution, last chunk ({len(halo)} convolutions):",
        "",
        "| conv input (whole frame) | halo rows | convs | bytes sent each | analytic | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for (shape, rows, sent, analytic), ratios in groups.items():
        lines.append(
            f"| {list(shape)} | {rows} | {len(ratios)} | {sent} | {analytic} | {sent / analytic:.3f} |"
        )
    lines += [
        "",
        f"**Halo total rank 0, one chunk: {total_sent / 2**20:.2f} MiB sent, analytic "
        f"{total_analytic / 2**20:.2f} MiB, ratio {total_sent / total_analytic:.3f}**; "
        f"all bytes rank 0 sent over the run: "
        + ", ".join(f"{name} {count / 2**20:.2f} MiB" for name, count in parallel["bytes"].items()),
    ]
    peak_ratio = max(parallel["peak_delta"]) / single_peak
    lines.append(
        f"**{n} ranks: {single_s / parallel_s:.2f}x decode speed-up per chunk; max rank peak "
        f"memory / one rank = {peak_ratio:.2f}** (target <= 0.6 at 2 ranks)"
    )
    body = "\n".join(lines)
    print(body)
    if args.record:
        record("Parallel decode (row slabs) vs one rank", command_line(), body, label=args.label)


if __name__ == "__main__":
    main()
