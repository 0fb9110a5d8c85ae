"""Benchmark: a long interactive session stays flat -- 500 chunks, a recache switch every 50.

A tiny Wan pipeline (random weights, fp32, no decoder: the session returns latents) runs one
:class:`~flashdreams.session.Session` for ``--chunks`` chunks with a sink of 1 frame and a
window of 4 frames (1-frame chunks), switching the prompt every ``--switch-every`` chunks in
``recache`` mode. Reported, end / start (start = the first ``--switch-every`` chunks after the
window filled, end = the last ``--switch-every`` chunks): the current RSS, the median and mean
per-chunk time, and the session's cache bytes (KV cache + kept latents). Switch chunks include
their re-cache, which replays the 5 cached chunks.

    python bench/bench_session.py [--record] [--chunks 500] [--switch-every 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_arguments, command_line, record, setup_torch  # noqa: E402

HEIGHT, WIDTH = 4, 6
PROMPTS = ["a red panda in a bamboo forest", "a red panda on a snowy mountain"]


def current_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_pipeline():
    import torch

    from flashdreams.infra.diffusion.model import DiffusionModelConfig
    from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
    from flashdreams.recipes.wan import (
        UMT5TextEncoderConfig,
        Wan21TransformerConfig,
        WanDiTNetworkTinyConfig,
        WanInferencePipelineConfig,
    )

    config = WanInferencePipelineConfig(
        name="bench-session",
        diffusion_model=DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=WanDiTNetworkTinyConfig(),
                dtype=torch.float32,
                len_t=1,
                window_size_t=4,
                sink_size_t=1,
                compile_network=False,
                use_cuda_graph=False,
            ),
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=2, denoising_timesteps=[1000, 500]
            ),
            seed=0,
        ),
        text_encoder=UMT5TextEncoderConfig(
            checkpoint_path=None,
            tokenizer_path="builtin:bytes",
            text_len=32,
            dtype=torch.float32,
            model_dim=32,
            num_layers=1,
            num_heads=2,
            ffn_dim=64,
            vocab_size=300,
        ),
    )
    torch.manual_seed(0)
    return config.setup().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--switch-every", type=int, default=50)
    args = parser.parse_args()
    setup_torch()
    from flashdreams.session import Session

    every = args.switch_every
    session = Session.open(build_pipeline(), prompt=PROMPTS[0], height=HEIGHT, width=WIDTH)
    seconds, rss, cache_bytes = [], [], []
    for index in range(args.chunks):
        if index and index % every == 0:
            session.switch_prompt(PROMPTS[(index // every) % 2])
        started = time.perf_counter()
        session.step()
        seconds.append(time.perf_counter() - started)
        rss.append(current_rss_mib())
        cache_bytes.append(session.cache_bytes())
    start, end = slice(every // 10, every // 10 + every), slice(-every, None)
    summary = session.telemetry.summary()
    rows = [
        ("RSS MiB (last chunk of the span)", rss[start][-1], rss[-1]),
        (
            "chunk ms, median",
            1e3 * statistics.median(seconds[start]),
            1e3 * statistics.median(seconds[end]),
        ),
        (
            "chunk ms, mean (switch chunks included)",
            1e3 * statistics.fmean(seconds[start]),
            1e3 * statistics.fmean(seconds[end]),
        ),
        ("cache bytes (KV + kept latents)", cache_bytes[start][-1], cache_bytes[-1]),
    ]
    lines = [
        f"{args.chunks} chunks, a recache switch every {every}; start = chunks "
        f"{start.start}..{start.stop - 1}, end = the last {every}.",
        "",
        "| measure | start | end | end / start |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {a:.2f} | {b:.2f} | {b / a:.3f} |" for name, a, b in rows]
    switches = summary["switches"]
    apply_ms = statistics.median(1e3 * s["apply_s"] for s in switches)
    first_ms = statistics.median(1e3 * s["first_frame_s"] for s in switches)
    lines += [
        "",
        f"{len(switches)} switches, median received -> applied {apply_ms:.1f} ms, "
        f"received -> first frame after it {first_ms:.1f} ms; denoise p50 / p95 "
        f"{1e3 * summary['denoise_p50_s']:.1f} / {1e3 * summary['denoise_p95_s']:.1f} ms; "
        f"time to first frame {1e3 * summary['time_to_first_frame_s']:.1f} ms.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.record:
        record("Session: 500 chunks with a switch every 50", command_line(), body, label=args.label)


if __name__ == "__main__":
    main()
