"""Benchmark 3: one Self-Forcing-style autoregressive step of the mid-size Wan DiT.

One AR step = 4 denoising forwards (flow-matching scheduler, timesteps 1000/750/500/250)
+ the context-noise forward that commits the chunk to the KV cache (``finalize``).
The cache keeps a sink of 1 chunk and a rolling window of 2 chunks, so it is full from
the 4th chunk on; the bench reports the first chunk, the fill-up chunks and the steady
state (window full, shapes constant).

Network: the mid-size DiT of ``bench_dit.py`` (dim 512, 8 heads, 4 layers, FFN 2048,
text 512 x 4096), CPU fp32, 2 threads. Spatial size scaled down from 480p so the run
stays under 2 minutes on 2 cores: latent 30x52 (one chunk = 3 latent frames = 1,170
tokens; a full cache attends over 4 chunks = 4,680 keys). Frames per second count video
frames (4 per latent frame, the Wan VAE's temporal ratio; its first chunk yields 9).

    python bench/bench_stream.py [--record] [--chunks N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import MidSize, network_config  # noqa: E402
from common import add_common_arguments, command_line, record, setup_torch  # noqa: E402

LEN_T, SINK_T, WINDOW_T = 3, 3, 6
LATENT_HEIGHT, LATENT_WIDTH = 30, 52


def build_streaming_model(shape: MidSize, *, len_t: int, sink_t: int, window_t: int, seed: int = 0):
    """A DiffusionModel (4-step flow matching, context noise 0) around a random-weight Wan DiT."""
    import torch

    from flashdreams.infra.diffusion.model import DiffusionModelConfig
    from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
    from flashdreams.recipes.wan.transformer import Wan21TransformerConfig

    torch.manual_seed(seed)
    config = DiffusionModelConfig(
        transformer=Wan21TransformerConfig(
            network=network_config(shape),
            dtype=torch.float32,
            len_t=len_t,
            sink_size_t=sink_t,
            window_size_t=window_t,
            compile_network=False,
            use_cuda_graph=False,
        ),
        scheduler=FlowMatchSchedulerConfig(
            num_inference_steps=4, denoising_timesteps=[1000, 750, 500, 250]
        ),
        seed=seed,
    )
    return config.setup().eval()


def run_chunks(model, cache, num_chunks: int) -> list[float]:
    """Seconds of each AR step (generate + finalize), in order."""
    times = []
    for index in range(num_chunks):
        start = time.perf_counter()
        _, final_state = model.generate(index, cache)
        model.finalize(final_state)
        times.append(time.perf_counter() - start)
    return times


def run(num_chunks: int = 7) -> dict[str, object]:
    import torch

    shape = MidSize(latent_height=LATENT_HEIGHT, latent_width=LATENT_WIDTH)
    model = build_streaming_model(shape, len_t=LEN_T, sink_t=SINK_T, window_t=WINDOW_T)
    text = torch.randn(
        1, shape.text_len, shape.text_dim, generator=torch.Generator().manual_seed(1)
    )
    start = time.perf_counter()
    cache = model.transformer.initialize_autoregressive_cache(
        height=LATENT_HEIGHT, width=LATENT_WIDTH, text_embeddings=text
    )
    init_seconds = time.perf_counter() - start
    times = run_chunks(model, cache, num_chunks)
    num_fill = (SINK_T + WINDOW_T) // LEN_T
    network_cache = cache.batched_network_cache
    assert network_cache.is_steady_state
    steady = times[num_fill + 1 :]
    return {
        "shape": shape,
        "init_seconds": init_seconds,
        "times": times,
        "num_fill": num_fill,
        "steady_median": statistics.median(steady),
        "steady_samples": steady,
    }


def format_result(result: dict[str, object]) -> str:
    shape: MidSize = result["shape"]  # type: ignore[assignment]
    times: list[float] = result["times"]  # type: ignore[assignment]
    num_fill: int = result["num_fill"]  # type: ignore[assignment]
    steady = result["steady_median"]
    frames = LEN_T * 4
    tokens = shape.num_tokens
    lines = [
        f"Mid-size DiT (dim {shape.dim}, {shape.num_heads} heads, {shape.num_layers} layers), "
        f"latent {LATENT_HEIGHT}x{LATENT_WIDTH}, chunk {LEN_T} latent frames = {tokens} tokens, "
        f"sink {SINK_T} + window {WINDOW_T} latent frames (full from chunk {num_fill}), "
        "4 denoising steps + finalize, fp32, batch 1",
        f"Rollout cache init (text embedding + cross-attn K/V, once): "
        f"{result['init_seconds'] * 1e3:.0f} ms",
        "",
        "| chunk | keys attended (denoise) | ms | video FPS |",
        "|---|---|---|---|",
    ]
    for index, seconds in enumerate(times):
        cached = min(index * LEN_T, SINK_T + WINDOW_T)
        keys = (cached + LEN_T) * tokens // LEN_T
        chunk_frames = frames - 3 if index == 0 else frames
        lines.append(f"| {index} | {keys} | {seconds * 1e3:.0f} | {chunk_frames / seconds:.2f} |")
    lines += [
        "",
        f"**First chunk {times[0] * 1e3:.0f} ms ({(frames - 3) / times[0]:.2f} FPS); steady "
        f"state {steady * 1e3:.0f} ms per chunk ({frames / steady:.2f} FPS, median of "  # type: ignore[operator]
        f"{len(result['steady_samples'])} chunks after the window filled)**",  # type: ignore[arg-type]
        "",
        "The 5 forwards of a chunk: 4 denoising steps + 1 commit; per forward "
        f"{steady / 5 * 1e3:.0f} ms at steady state.",  # type: ignore[operator]
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--chunks", type=int, default=7, help="AR chunks to run (>= 5)")
    args = parser.parse_args()
    setup_torch()
    text = format_result(run(num_chunks=args.chunks))
    print(text)
    if args.record:
        record("Streaming AR chunk (Self-Forcing style)", command_line(), text, label=args.label)


if __name__ == "__main__":
    main()
