"""runner.overlap_decode: rollout time with the decode of chunk i overlapped with the DiT of chunk i+1.

The real Runner rolls out one prompt of N chunks with a random-weight Wan T2V pipeline
sized so that the DiT step (4 denoising forwards + the KV-cache commit) and the VAE
decode of a chunk take comparable time on CPU: DiT dim 512, 8 heads, 6 layers; Wan VAE
decoder at base dim 12; latent 16x24 (128x192 pixels), 2 latent frames per chunk.

Variants, timed round-robin in one process (same pipeline object, rebuilt caches):

* ``sequential``: ``generate`` (encode, diffuse, decode) -> write -> ``finalize``.
* ``overlap``: ``runner.overlap_decode=true``; the worker keeps the default intra-op
  thread count (both threads use every core).
* ``overlap, worker 1 thread``: the same, with ``torch.set_num_threads(1)`` called on
  the worker thread. With OpenMP this changes the calling thread's pool only (the main
  thread keeps its count), but it is not thread-local: it becomes the default for
  threads started later and sets MKL's process-wide count (the main thread's matmuls
  too), so each variant resets the count on both threads first.

The time is the wall time of ``Runner.run`` with the pipeline already built (text
encoding, N chunks, the mp4 and stats.json); on 2 shared cores both threads compete for
the same cores, so the gain is bounded by how much of each thread's time is not
compute-bound (mp4 encoding, Python overhead, memory stalls).

    python bench/bench_overlap.py [--chunks N] [--repeats R] [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_description, setup_torch, spread, time_interleaved  # noqa: E402

LATENT_HEIGHT, LATENT_WIDTH = 16, 24
VAE_SPATIAL_RATIO = 8


def pipeline_config():
    import torch

    from flashdreams.infra.diffusion.model import DiffusionModelConfig
    from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
    from flashdreams.recipes.wan import (
        UMT5TextEncoderConfig,
        Wan21TransformerConfig,
        WanDiTNetworkConfig,
        WanInferencePipelineConfig,
        WanVAEDecoderConfig,
    )

    dim = 512
    return WanInferencePipelineConfig(
        name="bench-overlap",
        diffusion_model=DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=WanDiTNetworkConfig(
                    patch_size=(1, 2, 2),
                    text_len=64,
                    in_dim=16,
                    out_dim=16,
                    dim=dim,
                    ffn_dim=4 * dim,
                    freq_dim=256,
                    text_dim=64,
                    num_heads=8,
                    num_layers=6,
                ),
                dtype=torch.float32,
                checkpoint_path=None,
                len_t=2,
                window_size_t=4,
                sink_size_t=0,
                compile_network=False,
                use_cuda_graph=False,
            ),
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=4, denoising_timesteps=[1000, 750, 500, 250]
            ),
            seed=0,
        ),
        decoder=WanVAEDecoderConfig(
            checkpoint_path=None, dtype=torch.float32, base_dim=12, use_cuda_graph=False
        ),
        text_encoder=UMT5TextEncoderConfig(
            checkpoint_path=None,
            tokenizer_path="builtin:bytes",
            text_len=64,
            dtype=torch.float32,
            model_dim=64,
            num_layers=1,
            num_heads=2,
            ffn_dim=128,
            vocab_size=300,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8, help="chunks per rollout")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts per variant")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (main thread)")
    args = parser.parse_args()
    setup_torch(args.threads)
    import torch
    from loguru import logger

    from flashdreams.runner.runner import RunContext, Runner, RunnerConfig

    logger.remove()  # per-chunk log lines would be timed too
    config = pipeline_config()
    torch.manual_seed(0)
    pipeline = config.setup().eval()
    decode_latent = pipeline.decode_latent
    worker_threads = {"count": args.threads}

    def decode_with_thread_count(latent, autoregressive_index, cache):
        if torch.get_num_threads() != worker_threads["count"]:
            torch.set_num_threads(worker_threads["count"])
        return decode_latent(latent, autoregressive_index, cache)

    pipeline.decode_latent = decode_with_thread_count

    class PrebuiltRunner(Runner):
        def build_pipeline(self):
            return pipeline

    stage_times: dict[str, list[dict[str, float]]] = {}

    def rollout(name: str, *, overlap: bool, worker_thread_count: int, out_dir: Path):
        def run() -> None:
            # set_num_threads also sets MKL's process-wide count: undo the last variant's.
            torch.set_num_threads(args.threads)
            worker_threads["count"] = worker_thread_count
            runner = PrebuiltRunner(
                RunnerConfig(
                    prompt="a red panda",
                    num_chunks=args.chunks,
                    height=LATENT_HEIGHT * VAE_SPATIAL_RATIO,
                    width=LATENT_WIDTH * VAE_SPATIAL_RATIO,
                    overlap_decode=overlap,
                ),
                pipeline_config=config,
                context=RunContext(run_dir=out_dir / name.replace(" ", "_").replace(",", "")),
            )
            stats = runner.run()
            assert torch.get_num_threads() == args.threads, "the main thread's count changed"
            steady = stats["chunks"][1:]
            stage_times.setdefault(name, []).append(
                {
                    key: statistics.mean(chunk.get(key, 0.0) for chunk in steady)
                    for key in ("generate_s", "decode_s", "write_s", "finalize_s", "wait_s")
                }
            )

        return run

    with tempfile.TemporaryDirectory() as temporary:
        out_dir = Path(temporary)
        variants = {
            "sequential": rollout(
                "sequential", overlap=False, worker_thread_count=args.threads, out_dir=out_dir
            ),
            "overlap": rollout(
                "overlap", overlap=True, worker_thread_count=args.threads, out_dir=out_dir
            ),
            "overlap, worker 1 thread": rollout(
                "overlap, worker 1 thread", overlap=True, worker_thread_count=1, out_dir=out_dir
            ),
        }
        samples = time_interleaved(variants, num_repeats=args.repeats, num_warmup=1)

    print(f"Machine: {machine_description()}")
    print(
        f"Rollout of {args.chunks} chunks ({LATENT_HEIGHT * VAE_SPATIAL_RATIO}x"
        f"{LATENT_WIDTH * VAE_SPATIAL_RATIO} px, 2 latent frames = 8 video frames a chunk), "
        f"median of {args.repeats}, round-robin\n"
    )
    baseline = statistics.median(samples["sequential"])
    print("| variant | rollout s | spread | vs sequential | steady chunk: DiT s | decode s | "
          "write s | finalize s | main waits s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, times in samples.items():
        median = statistics.median(times)
        # The first (warm-up) rollout is left out of the stage means.
        stages = stage_times[name][1:]
        mean = {key: statistics.mean(s[key] for s in stages) for key in stages[0]}
        print(
            f"| {name} | {median:.2f} | {spread(times)} | {baseline / median:.2f}x | "
            f"{mean['generate_s']:.3f} | {mean['decode_s'] or float('nan'):.3f} | "
            f"{mean['write_s']:.3f} | {mean['finalize_s']:.3f} | {mean['wait_s']:.3f} |"
        )
    print(
        "\nratio (sequential / overlap): "
        f"{baseline / statistics.median(samples['overlap']):.2f}x; with a 1-thread worker: "
        f"{baseline / statistics.median(samples['overlap, worker 1 thread']):.2f}x"
    )
    print(
        "sequential 'DiT s' includes the decode (generate = encode + diffuse + decode); "
        "with overlap the decode and write run on the worker thread."
    )


if __name__ == "__main__":
    main()
