"""Benchmark 8 (GPU only): Self-Forcing 1.3B-shaped Wan DiT, 480x832, 4 steps, batch 1, bf16.

Random weights with the Wan 2.1 1.3B network shape (dim 1536, 12 heads, 30 layers, text
512 x 4096). One AR step = 3 latent frames (4,680 tokens) = 4 denoising forwards + the
commit forward; the KV cache holds a rolling window of 21 latent frames (Self-Forcing's
setting), so it is full from chunk 7 on. Reported per acceleration mode:

* DiT ms per AR step at steady state (median over the chunks after the window filled);
  reference points on one H100: FlashDreams 344 ms, the official Self-Forcing code
  432 ms; our target < 300 ms;
* end-to-end FPS of the steady-state chunks including the decode, with the Wan 2.1 VAE
  (random weights, full size) and with TAEHV (random weights); Self-Forcing reports
  17 FPS, our target > 25.

Modes: ``eager`` (no compile, no graphs), ``compile`` (``torch.compile`` of the network),
``cudagraph`` (compile + CUDA-graph replay of the steady-state step); the low-precision
rows ``cudagraph-int8`` (int8 weight-only), ``cudagraph-fp8`` (torchao fp8 weights and
activations, needs compute capability >= 8.9), ``cudagraph-fp8-kv_fp8`` (plus an fp8
e4m3 KV cache) and ``eager-te_fp8`` (transformer-engine linears under fp8 autocast, needs
the ``[gpu]`` extra). A mode whose hardware or package is missing is reported and skipped.

On a machine without CUDA the script prints a message and exits 0. ``--smoke`` runs the
same code path on CPU at a tiny size (fp32, 2 + 2 chunks) to check that it works.

    python bench/gpu/bench_gpu.py [--modes eager,compile,cudagraph] [--chunks 12] [--record]
    python bench/gpu/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import command_line, record  # noqa: E402

REFERENCE_POINTS_MS = {"FlashDreams (published, H100)": 344, "Self-Forcing official (H100)": 432}
TARGET_MS, TARGET_FPS = 300, 25
MODES = {
    "eager": dict(compile_network=False, use_cuda_graph=False),
    "compile": dict(compile_network=True, use_cuda_graph=False),
    "cudagraph": dict(compile_network=True, use_cuda_graph=True),
    # Low-precision tier (README "Low precision"): weights, KV cache, transformer-engine.
    "cudagraph-int8": dict(
        compile_network=True, use_cuda_graph=True, quantization="int8_weight_only"
    ),
    "cudagraph-fp8": dict(compile_network=True, use_cuda_graph=True, quantization="fp8"),
    "cudagraph-fp8-kv_fp8": dict(
        compile_network=True,
        use_cuda_graph=True,
        quantization="fp8",
        kv_cache_dtype="fp8_e4m3",
    ),
    "eager-te_fp8": dict(compile_network=False, use_cuda_graph=False, quantization="te_fp8"),
}


def build(mode: str, *, smoke: bool, device, dtype, decoder_kind: str):  # noqa: ANN001
    """(DiffusionModel, decoder, latent height, latent width, text embeddings)."""
    import torch

    from flashdreams.infra.diffusion.model import DiffusionModelConfig
    from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
    from flashdreams.recipes.taehv.model import TeahvVAEDecoderConfig
    from flashdreams.recipes.wan import WanVAEDecoderConfig
    from flashdreams.recipes.wan.transformer import (
        Wan21TransformerConfig,
        WanDiTNetwork1pt3BConfig,
        WanDiTNetworkTinyConfig,
    )

    network = WanDiTNetworkTinyConfig() if smoke else WanDiTNetwork1pt3BConfig()
    height, width = (4, 6) if smoke else (60, 104)
    torch.manual_seed(0)
    model = (
        DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=network,
                dtype=dtype,
                checkpoint_path=None,
                len_t=3,
                window_size_t=6 if smoke else 21,
                sink_size_t=0,
                **MODES[mode],
            ),
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=4, denoising_timesteps=[1000, 750, 500, 250]
            ),
            seed=0,
        )
        .setup()
        .to(device)
        .eval()
    )
    graphs = MODES[mode]["use_cuda_graph"]
    if decoder_kind == "wan-vae":
        vae_kwargs = dict(base_dim=8) if smoke else {}
        decoder = WanVAEDecoderConfig(
            checkpoint_path=None, dtype=dtype, use_cuda_graph=graphs, **vae_kwargs
        ).setup()
    else:
        decoder = TeahvVAEDecoderConfig(
            checkpoint_path=None, dtype=dtype, use_cuda_graph=graphs, use_compile=graphs
        ).setup()
    decoder = decoder.to(device).eval()
    text = torch.randn(1, network.text_len, network.text_dim, device=device, dtype=dtype)
    return model, decoder, height, width, text


def run_mode(mode: str, *, num_chunks: int, smoke: bool, decoder_kind: str) -> dict[str, object]:
    import torch

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model, decoder, height, width, text = build(
        mode, smoke=smoke, device=device, dtype=dtype, decoder_kind=decoder_kind
    )
    cache = model.transformer.initialize_autoregressive_cache(
        height=height, width=width, text_embeddings=text
    )
    decoder_cache = decoder.initialize_autoregressive_cache()
    dit_ms, total_ms, frames = [], [], []
    with torch.no_grad():
        for index in range(num_chunks):
            synchronize()
            start = time.perf_counter()
            clean, final_state = model.generate(index, cache)
            model.finalize(final_state)
            synchronize()
            dit_done = time.perf_counter()
            video = decoder(input=clean, autoregressive_index=index, cache=decoder_cache)
            synchronize()
            end = time.perf_counter()
            dit_ms.append((dit_done - start) * 1e3)
            total_ms.append((end - start) * 1e3)
            frames.append(int(video.shape[-4]) if video is not None else 0)
    steady_from = model.transformer.cuda_graph_capture_ar_idx + 2
    steady = slice(min(steady_from, num_chunks - 1), None)
    steady_total_s = sum(total_ms[steady]) / 1e3
    return {
        "dit_first_ms": dit_ms[0],
        "dit_steady_ms": statistics.median(dit_ms[steady]),
        "fps_steady": sum(frames[steady]) / steady_total_s,
        "num_steady": len(dit_ms[steady]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--modes",
        default="eager,compile,cudagraph,cudagraph-int8,cudagraph-fp8,cudagraph-fp8-kv_fp8,"
        "eager-te_fp8",
    )
    parser.add_argument("--decoders", default="wan-vae,taehv")
    parser.add_argument("--chunks", type=int, default=12, help="AR chunks per mode")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the code path")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--label", default="", help="label of the RESULTS.md section")
    args = parser.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu/bench_gpu.py: no CUDA device here; the GPU benchmark was skipped.")
        return
    if not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = True
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if args.smoke:
        modes = ["eager"]  # compile and CUDA graphs need a GPU
    num_chunks = 4 if args.smoke else args.chunks
    rows = []
    for mode in modes:
        for decoder_kind in args.decoders.split(","):
            try:
                result = run_mode(
                    mode, num_chunks=num_chunks, smoke=args.smoke, decoder_kind=decoder_kind
                )
            except (ImportError, ValueError) as error:  # fp8 / TE not available here
                print(f"{mode} {decoder_kind}: skipped: {error}", flush=True)
                continue
            rows.append((mode, decoder_kind, result))
            print(mode, decoder_kind, result, flush=True)
    if args.smoke:
        shape = (
            "SMOKE RUN (code path only, not a measurement): tiny Wan DiT, latent 4x6, "
            "window 6, Wan VAE base dim 8, fp32, eager only"
        )
        device_name = "CPU"
    else:
        shape = (
            "Wan 1.3B shape, random weights, 480x832 (latent 60x104), chunk 3 latent "
            "frames, window 21, 4 steps + commit, batch 1, bf16"
        )
        device_name = torch.cuda.get_device_name()
    lines = [
        f"Device: {device_name}. {shape}",
        "",
        "| mode | decoder | DiT ms first chunk | DiT ms / AR step (steady) | e2e FPS (steady) |",
        "|---|---|---|---|---|",
    ]
    for mode, decoder_kind, result in rows:
        lines.append(
            f"| {mode} | {decoder_kind} | {result['dit_first_ms']:.0f} | "
            f"{result['dit_steady_ms']:.0f} | {result['fps_steady']:.1f} |"
        )
    references = ", ".join(f"{name} {ms} ms" for name, ms in REFERENCE_POINTS_MS.items())
    lines += ["", f"Targets: < {TARGET_MS} ms per AR step, > {TARGET_FPS} FPS. {references}."]
    text = "\n".join(lines)
    print(text)
    if args.record and not args.smoke:
        record("GPU: Self-Forcing 1.3B shape", command_line(), text, label=args.label)


if __name__ == "__main__":
    main()
