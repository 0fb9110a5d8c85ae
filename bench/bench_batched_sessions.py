"""Benchmark: N sessions over one model, batched into one forward vs stepped one by one.

The mid-size DiT of the CPU benchmarks (dim 512, 8 heads, 4 layers, FFN 2048; random
weights, fp32, 2 threads), chunks of 3 latent frames, 4 denoising steps + the commit pass,
a rolling window of one chunk. The real Self-Forcing chunk (a 60x104 latent, 480x832
video: 4,680 tokens) is ``--latent 60 104``; on the 2-core machine one of its chunks takes
~17 s, so the default is the 30x52 latent of ``bench_stream.py`` (1,170 tokens). No decoder (each session decodes its own rows either way, so
decoding does not change the comparison). For N = 1, 2, 4 two :class:`SessionManager` s
hold N sessions each (different prompts and seeds) over the same pipeline, one with
``batch=True`` and one with ``batch=False``; after ``--warmup`` rounds (window full) they
step round by round, interleaved (A B A B ...), so host load hits both alike.

Reported per N: a round's wall time (every session one chunk), throughput in chunks per
second and batched / one-by-one; the per-session chunk latency p50 / p95 (a batched
session's chunk takes the whole batched forward; one stepped alone takes its own forward,
but waits for the others' between its chunks: its chunk period is the round time); and
the largest difference between a batched session's latents and the same session stepped
alone (must be <= 1e-5).

    python bench/bench_batched_sessions.py [--record] [--sizes 1 2 4] [--rounds 3]
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

LEN_T, WINDOW_T = 3, 3
PROMPTS = [
    "a red panda in a bamboo forest",
    "a lighthouse on a cliff at dusk",
    "a paper boat on a rainy street",
    "a fox running through fresh snow",
]


def build_pipeline():
    import torch

    from flashdreams.infra.diffusion.model import DiffusionModelConfig
    from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
    from flashdreams.recipes.wan import (
        UMT5TextEncoderConfig,
        Wan21TransformerConfig,
        WanInferencePipelineConfig,
    )

    shape = MidSize(text_dim=64, text_len=512)
    config = WanInferencePipelineConfig(
        name="bench-batched-sessions",
        diffusion_model=DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=network_config(shape),
                dtype=torch.float32,
                len_t=LEN_T,
                window_size_t=WINDOW_T,
                sink_size_t=0,
                compile_network=False,
                use_cuda_graph=False,
            ),
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=4, denoising_timesteps=[1000, 750, 500, 250]
            ),
            seed=0,
        ),
        text_encoder=UMT5TextEncoderConfig(
            checkpoint_path=None,
            tokenizer_path="builtin:bytes",
            text_len=512,
            dtype=torch.float32,
            model_dim=64,
            num_layers=1,
            num_heads=2,
            ffn_dim=128,
            vocab_size=300,
        ),
    )
    torch.manual_seed(0)
    return config.setup().eval()


def open_manager(pipeline, num_sessions: int, latent: tuple[int, int], *, batch: bool):
    from flashdreams.session import SessionManager

    manager = SessionManager(pipeline, max_sessions=num_sessions, batch=batch)
    for entry in range(num_sessions):
        manager.open(
            prompt=PROMPTS[entry],
            height=latent[0],
            width=latent[1],
            seed=entry,
            decode=False,
        )
    return manager


def measure(
    pipeline, num_sessions: int, latent: tuple[int, int], *, warmup: int, rounds: int
) -> dict[str, float]:
    managers = {
        "batched": open_manager(pipeline, num_sessions, latent, batch=True),
        "one by one": open_manager(pipeline, num_sessions, latent, batch=False),
    }
    round_s: dict[str, list[float]] = {name: [] for name in managers}
    latents: dict[str, list[dict]] = {name: [] for name in managers}
    for index in range(warmup + rounds):
        for name, manager in managers.items():
            started = time.perf_counter()
            results = manager.step()
            elapsed = time.perf_counter() - started
            latents[name].append({sid: result.latent for sid, result in results.items()})
            if index >= warmup:
                round_s[name].append(elapsed)
    max_error = max(
        (batched[sid] - alone[sid]).abs().max().item()
        for batched, alone in zip(latents["batched"], latents["one by one"], strict=True)
        for sid in batched
    )
    out: dict[str, float] = {"max_error": max_error}
    for name, manager in managers.items():
        denoise = [
            seconds
            for session in manager.sessions.values()
            for seconds in session.telemetry.denoise_s[warmup:]
        ]
        out[f"{name} round"] = statistics.median(round_s[name])
        out[f"{name} p50"] = statistics.median(denoise)
        out[f"{name} p95"] = sorted(denoise)[max(0, round(0.95 * len(denoise)) - 1)]
        for session_id in list(manager.sessions):
            manager.close(session_id)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--warmup", type=int, default=1, help="rounds before timing")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    parser.add_argument(
        "--latent", type=int, nargs=2, default=[30, 52], help="latent height and width"
    )
    args = parser.parse_args()
    setup_torch()
    pipeline = build_pipeline()
    latent_height, latent_width = args.latent
    tokens = LEN_T * (latent_height // 2) * (latent_width // 2)
    lines = [
        f"Mid-size DiT (dim 512, 8 heads, 4 layers), chunk {LEN_T} latent frames of "
        f"{latent_height}x{latent_width} = {tokens} tokens, window {WINDOW_T} frames, "
        f"4 steps + commit, fp32, no decoder; {args.rounds} timed rounds (median) after "
        f"{args.warmup}, batched and one-by-one interleaved.",
        "",
        "| sessions | round s, batched | round s, one by one | chunks/s batched | "
        "chunks/s one by one | throughput batched / one by one | chunk latency p50 / p95 s, "
        "batched | chunk latency p50 / p95 s, one by one | max abs batched vs alone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for num_sessions in args.sizes:
        result = measure(
            pipeline, num_sessions, tuple(args.latent), warmup=args.warmup, rounds=args.rounds
        )
        batched, alone = result["batched round"], result["one by one round"]
        lines.append(
            f"| {num_sessions} | {batched:.2f} | {alone:.2f} | {num_sessions / batched:.3f} | "
            f"{num_sessions / alone:.3f} | {alone / batched:.2f}x | "
            f"{result['batched p50']:.2f} / {result['batched p95']:.2f} | "
            f"{result['one by one p50']:.2f} / {result['one by one p95']:.2f} | "
            f"{result['max_error']:.1e} |"
        )
        print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if args.record:
        record("Batched sessions vs one by one", command_line(), body, label=args.label)


if __name__ == "__main__":
    main()
