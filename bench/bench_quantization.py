"""Low-precision tier on CPU: weight bytes, DiT forward time and error per quantisation mode.

The mid-size DiT of the CPU benchmarks (dim 512, 8 heads, 4 layers, FFN 2048, text
512 x 4096) with seeded random weights, one chunk of 3 latent frames at a 30x52 latent
(1,170 tokens), the rollout-step forward (``predict_flow`` with the cache built). Every
mode is built from the same weights and timed round-robin in one run, so the ratios are
side by side. Rows:

* ``fp32`` (the reference) and ``int8_weight_only`` with fp32 compute (bf16 compute is
  the GPU setting; the CPU runs fp32);
* KV-cache storage (``kv_cache_dtype``) with fp32 weights: the forward reads a cache
  holding one committed chunk, so the dequantisation cost is in the time.

Errors are relative L2 of the flow against ``fp32``; bytes are the network's parameters
(quantised weights at their storage size) and the self-attention KV cache.

    python bench/bench_quantization.py [--record] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_arguments,
    command_line,
    record,
    setup_torch,
    spread,
    time_interleaved,
)

NUM_FRAMES, LATENT_HEIGHT, LATENT_WIDTH = 3, 30, 52
MODES = {
    # name: (compute dtype name, quantization, kv_cache_dtype)
    "fp32": ("float32", "none", "none"),
    "int8_weight_only (fp32 compute)": ("float32", "int8_weight_only", "none"),
    "fp32 + kv_cache int8": ("float32", "none", "int8"),
    "fp32 + kv_cache fp8_e4m3": ("float32", "none", "fp8_e4m3"),
}


def build(dtype_name: str, quantization: str, kv_cache_dtype: str):  # noqa: ANN201
    """(transformer, cache, latent, timestep) with one committed chunk in the cache."""
    import torch

    from flashdreams.recipes.wan.transformer import Wan21TransformerConfig, WanDiTNetworkConfig

    network = WanDiTNetworkConfig(
        dim=512, num_heads=8, num_layers=4, ffn_dim=2048, freq_dim=256, text_dim=4096
    )
    extra = {} if kv_cache_dtype == "none" else {"kv_cache_dtype": kv_cache_dtype}
    config = Wan21TransformerConfig(
        network=network,
        dtype=getattr(torch, dtype_name),
        len_t=NUM_FRAMES,
        window_size_t=NUM_FRAMES,
        compile_network=False,
        use_cuda_graph=False,
        quantization=quantization,
        **extra,
    )
    torch.manual_seed(0)
    transformer = config.setup().eval()
    text = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1))
    cache = transformer.initialize_autoregressive_cache(
        height=LATENT_HEIGHT, width=LATENT_WIDTH, text_embeddings=text
    )
    latent = torch.randn(transformer.latent_shape, generator=torch.Generator().manual_seed(2))
    timestep = torch.tensor(700.0)
    transformer.finalize_kv_cache(latent, torch.tensor(0.0), cache)
    return transformer, cache, latent, timestep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated mode names")
    args = parser.parse_args()
    args.repeats = args.repeats or 5
    setup_torch()
    import torch

    from flashdreams.core.quantization import parameter_bytes

    names = [name.strip() for name in args.modes.split(",")]
    built = {name: build(*MODES[name]) for name in names}
    outputs = {
        name: transformer.predict_flow(latent, timestep, cache).float()
        for name, (transformer, cache, latent, timestep) in built.items()
    }
    calls = {name: (lambda b=b: b[0].predict_flow(b[2], b[3], b[1])) for name, b in built.items()}
    samples = time_interleaved(calls, num_repeats=args.repeats)
    reference_name = names[0]
    reference = outputs[reference_name]
    reference_time = statistics.median(samples[reference_name])
    reference_bytes = parameter_bytes(built[reference_name][0].network)
    rows = [
        f"Shape: dim 512, 8 heads, 4 layers, FFN 2048, {NUM_FRAMES} latent frames at "
        f"{LATENT_HEIGHT}x{LATENT_WIDTH} (1170 tokens), text 512x4096, batch 1; "
        f"rollout-step forward, one chunk in the KV cache. Reference: {reference_name}.",
        "",
        "| mode | median s | spread | time / ref | weight MiB | weights / ref "
        "| KV cache KiB | rel. error vs ref |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        transformer, cache, _, _ = built[name]
        median = statistics.median(samples[name])
        weights = parameter_bytes(transformer.network)
        kv_bytes = cache.batched_network_cache.self_attention_storage_bytes()
        error = ((outputs[name] - reference).norm() / reference.norm()).item()
        rows.append(
            f"| {name} | {median:.3f} | {spread(samples[name])} | {median / reference_time:.2f} "
            f"| {weights / 2**20:.1f} | {weights / reference_bytes:.3f} | {kv_bytes / 1024:.0f} "
            f"| {error:.2e} |"
        )
    blocks = {name: parameter_bytes(built[name][0].network.blocks) for name in names}
    rows += [
        "",
        "Block linears only (what is quantised; embeddings, head and modulation keep "
        "their dtype): "
        + ", ".join(f"{name} {blocks[name] / blocks[reference_name]:.3f}x" for name in names),
        f"torch {torch.__version__}, {args.repeats} interleaved repeats after one warm-up.",
    ]
    body = "\n".join(rows)
    print(body)
    if args.record:
        record(
            "Low-precision tier: weights, KV cache, time", command_line(), body, label=args.label
        )


if __name__ == "__main__":
    main()
