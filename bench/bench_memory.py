"""Benchmark 6: memory of a long rollout, peak RSS after 200 AR chunks vs after the window filled.

A small Wan DiT (dim 256, 4 heads, 2 layers) streams 200 Self-Forcing-style chunks (4
denoising steps + finalize each) with a sink of 1 chunk and a window of 2 chunks. The
process peak RSS (``ru_maxrss``) and the current RSS are read when the window first
fills and after chunk 200; the ratio of the peaks is the headline (target <= 1.05).
The KV-cache storage bytes and the storage address of block 0's keys are checked too:
the cache is preallocated and written in place, so neither may change.

Run in its own process (``run_all.py`` does) so earlier work does not set the peak.

    python bench/bench_memory.py [--record] [--chunks 200]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import MidSize  # noqa: E402
from bench_stream import build_streaming_model  # noqa: E402
from common import add_common_arguments, command_line, record, setup_torch  # noqa: E402

LEN_T, SINK_T, WINDOW_T = 3, 3, 6
LATENT_HEIGHT, LATENT_WIDTH = 16, 24
SHAPE = MidSize(
    dim=256,
    num_heads=4,
    num_layers=2,
    ffn_dim=512,
    freq_dim=64,
    text_dim=256,
    text_len=64,
    latent_height=LATENT_HEIGHT,
    latent_width=LATENT_WIDTH,
)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def run(num_chunks: int = 200) -> dict[str, object]:
    import torch

    model = build_streaming_model(SHAPE, len_t=LEN_T, sink_t=SINK_T, window_t=WINDOW_T)
    text = torch.randn(
        1, SHAPE.text_len, SHAPE.text_dim, generator=torch.Generator().manual_seed(1)
    )
    cache = model.transformer.initialize_autoregressive_cache(
        height=LATENT_HEIGHT, width=LATENT_WIDTH, text_embeddings=text
    )
    network_cache = cache.batched_network_cache
    keys_storage = network_cache.blocks[0].self_kv.k.untyped_storage().data_ptr()
    start = time.perf_counter()
    snapshots = {}
    for index in range(num_chunks):
        _, final_state = model.generate(index, cache)
        model.finalize(final_state)
        if network_cache.is_steady_state and "filled" not in snapshots:
            snapshots["filled"] = (index + 1, peak_rss_mib(), current_rss_mib())
            filled_bytes = network_cache.self_attention_storage_bytes()
    snapshots["end"] = (num_chunks, peak_rss_mib(), current_rss_mib())
    elapsed = time.perf_counter() - start
    same_storage = network_cache.blocks[0].self_kv.k.untyped_storage().data_ptr() == keys_storage
    return {
        "snapshots": snapshots,
        "elapsed": elapsed,
        "filled_bytes": filled_bytes,
        "end_bytes": network_cache.self_attention_storage_bytes(),
        "same_storage": same_storage,
    }


def format_result(result: dict[str, object]) -> str:
    snapshots: dict[str, tuple[int, float, float]] = result["snapshots"]  # type: ignore[assignment]
    filled, end = snapshots["filled"], snapshots["end"]
    tokens = SHAPE.num_tokens
    lines = [
        f"DiT dim {SHAPE.dim}, {SHAPE.num_heads} heads, {SHAPE.num_layers} layers; latent "
        f"{LATENT_HEIGHT}x{LATENT_WIDTH}, chunk {LEN_T} latent frames = {tokens} tokens, sink "
        f"{SINK_T} + window {WINDOW_T} latent frames; 4 steps + finalize per chunk, fp32; "
        f"{end[0]} chunks in {result['elapsed']:.1f} s",
        "",
        "| point | chunks done | peak RSS MiB | current RSS MiB | KV cache bytes |",
        "|---|---|---|---|---|",
        f"| window first full | {filled[0]} | {filled[1]:.1f} | {filled[2]:.1f} | "
        f"{result['filled_bytes']} |",
        f"| end of rollout | {end[0]} | {end[1]:.1f} | {end[2]:.1f} | {result['end_bytes']} |",
        "",
        f"**Peak RSS ratio (after {end[0]} chunks / window first full): {end[1] / filled[1]:.4f}** "
        f"(target <= 1.05); current RSS ratio {end[2] / filled[2]:.4f}; KV storage "
        f"{'unchanged, same address' if result['same_storage'] else 'REALLOCATED'}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--chunks", type=int, default=200, help="AR chunks to run")
    args = parser.parse_args()
    setup_torch()
    text = format_result(run(num_chunks=args.chunks))
    print(text)
    if args.record:
        record("Memory over a 200-chunk rollout", command_line(), text, label=args.label)


if __name__ == "__main__":
    main()
