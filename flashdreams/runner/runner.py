"""Runner: the command-line-facing I/O around a streaming pipeline.

The runner reads prompts and an optional first frame, builds the pipeline,
drives the ``initialize_cache -> (generate, write, finalize) * num_chunks``
rollout, and persists the result. Every rank runs the rollout (context
parallelism needs all of them); only rank 0 writes files and shows progress.

Run directory layout (written by rank 0)::

    video.mp4            decoded video, appended chunk by chunk
    config.yaml          resolved config of the run (reloads to an equal config)
    stats.json           per-chunk timings, first-chunk latency, steady FPS, memory, layout
    latents.safetensors  clean latents of all chunks (runner.save_latents=true)
    log_rank<r>.txt      one log file per rank
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashdreams.infra.config import InstantiateConfig


@dataclass(kw_only=True)
class RunnerConfig(InstantiateConfig):
    """What to generate and where to write it; set as ``runner.<field>=...``."""

    _target: type[Runner] = field(default_factory=lambda: Runner)
    """Runner class built by ``setup()``."""
    prompt: str | list[str] = "A red panda rolls down a grassy hill at sunset."
    """One prompt, or a list of prompts rolled out one after another."""
    prompts_file: str | None = None
    """Text file with one prompt per line; replaces ``prompt`` when set."""
    image: str | None = None
    """First frame (image file) for I2V pipelines; resized to ``height`` x ``width``."""
    num_chunks: int = 2
    """Number of autoregressive steps (chunks) to generate per prompt."""
    height: int = 480
    """Video height in pixels; must be a multiple of the decoder's spatial compression."""
    width: int = 832
    """Video width in pixels; must be a multiple of the decoder's spatial compression."""
    seed: int = 0
    """Seeds torch's global RNG before the pipeline is built, identically on every rank."""
    output_dir: str | None = None
    """Run directory; ``None`` means ``outputs/<slug>/<time>/`` under the working directory."""
    fps: float = 16.0
    """Frame rate written into the mp4."""
    save_latents: bool = False
    """Also write the clean latents of all chunks to ``latents.safetensors``."""
    profile: bool = False
    """Time every stage of every AR step (sets ``pipeline.enable_sync_and_profile``)."""


@dataclass(kw_only=True)
class RunContext:
    """Where a run sits in the job: rank, world size, run directory, device."""

    run_dir: Path
    """Run directory all ranks agreed on."""
    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of ranks; equals the context-parallel size."""
    device: str = "cpu"
    """Torch device of this rank."""
    resolved_config: dict[str, Any] | None = None
    """Plain-data config of the run; rank 0 saves it as ``config.yaml``."""


def _peak_host_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def validate_runner_config(config: RunnerConfig) -> None:
    """Check user input before anything is built or written (``ValueError`` / ``FileNotFoundError``)."""
    if config.num_chunks < 1:
        raise ValueError(f"runner.num_chunks must be >= 1, got {config.num_chunks}")
    if config.height < 1 or config.width < 1:
        raise ValueError(
            f"runner.height and runner.width must be positive, got {config.height}x{config.width}"
        )
    if config.fps <= 0:
        raise ValueError(f"runner.fps must be positive, got {config.fps}")
    if config.prompts_file is not None and not Path(config.prompts_file).is_file():
        raise FileNotFoundError(f"runner.prompts_file: no such file '{config.prompts_file}'")
    if config.image is not None and not Path(config.image).is_file():
        raise FileNotFoundError(f"runner.image: no such file '{config.image}'")


class Runner:
    """Runs one pipeline config for the prompts of a :class:`RunnerConfig`."""

    def __init__(self, config: RunnerConfig, *, pipeline_config: Any, context: RunContext) -> None:
        self.config = config
        self.pipeline_config = pipeline_config
        self.context = context
        self.is_writer = context.rank == 0
        validate_runner_config(config)

    # ---- inputs -------------------------------------------------------------

    def prompts(self) -> list[str]:
        """Prompts to roll out, in order."""
        if self.config.prompts_file is not None:
            lines = Path(self.config.prompts_file).read_text(encoding="utf-8").splitlines()
            prompts = [line.strip() for line in lines if line.strip()]
        elif isinstance(self.config.prompt, str):
            prompts = [self.config.prompt]
        else:
            prompts = list(self.config.prompt)
        if not prompts:
            raise ValueError("no prompt given: set runner.prompt or runner.prompts_file")
        return prompts

    def first_frame(self, height: int, width: int):
        """The I2V first frame as ``[1, 1, 3, H, W]`` in ``[-1, 1]``, or ``None``."""
        if self.config.image is None:
            return None
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(self.config.image) as image:
            rgb = image.convert("RGB").resize((width, height), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return pixels[None, None]

    # ---- pipeline ------------------------------------------------------------

    def build_pipeline(self):
        """Seed the global RNG and build the pipeline on this rank's device."""
        import torch

        from flashdreams.infra.config import derive_config

        pipeline_config = self.pipeline_config
        if self.config.profile:
            pipeline_config = derive_config(pipeline_config, enable_sync_and_profile=True)
        torch.manual_seed(self.config.seed)
        pipeline = pipeline_config.setup()
        return pipeline.to(self.context.device).eval()

    @staticmethod
    def _latent_size(pipeline: Any, height: int, width: int) -> tuple[int, int]:
        decoder = getattr(pipeline, "decoder", None)
        ratio = int(getattr(decoder, "spatial_compression_ratio", 1) or 1)
        if height % ratio or width % ratio:
            raise ValueError(
                f"runner.height={height} and runner.width={width} must be multiples of the "
                f"decoder's spatial compression ratio {ratio}"
            )
        return height // ratio, width // ratio

    @staticmethod
    def _chunk_latent(pipeline: Any, cache: Any):
        """Unpatchified (CP-gathered) clean latent of the latest ``generate``, if reachable."""
        final_state = getattr(cache, "final_state", None)
        if final_state is None:
            return None
        transformer = pipeline.diffusion_model.transformer
        return transformer.unpatchify_and_maybe_gather_cp(final_state.clean_latent)

    # ---- rollout ---------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Roll out every prompt; returns the stats that rank 0 writes to ``stats.json``."""
        import torch
        from loguru import logger

        context = self.context
        run_dir = context.run_dir
        prompts = self.prompts()
        if self.is_writer:
            run_dir.mkdir(parents=True, exist_ok=True)
            if context.resolved_config is not None:
                from flashdreams.launch.run_config import save_run_config

                save_run_config(context.resolved_config, run_dir / "config.yaml")

        started = time.perf_counter()
        pipeline = self.build_pipeline()
        build_s = time.perf_counter() - started
        logger.info(f"built pipeline '{self.pipeline_config.name}' in {build_s:.2f} s")
        latent_height, latent_width = self._latent_size(
            pipeline, self.config.height, self.config.width
        )

        rollouts = []
        all_latents: dict[str, torch.Tensor] = {}
        for prompt_index, prompt in enumerate(prompts):
            name = "video.mp4" if len(prompts) == 1 else f"video_{prompt_index:03d}.mp4"
            rollout, latents = self._rollout(
                pipeline, prompt, run_dir / name, latent_height, latent_width
            )
            rollout["prompt"] = prompt
            rollout["video"] = name
            rollouts.append(rollout)
            if latents is not None:
                key = "latents" if len(prompts) == 1 else f"latents_{prompt_index:03d}"
                all_latents[key] = latents

        stats: dict[str, Any] = {
            "pipeline": self.pipeline_config.name,
            "world_size": context.world_size,
            "cp_layout": self._cp_layout(pipeline),
            "device": str(context.device),
            "build_s": build_s,
            "total_s": time.perf_counter() - started,
            "peak_host_memory_mib": _peak_host_memory_mib(),
            "rollouts": rollouts,
        }
        first = rollouts[0]
        stats["first_chunk_latency_s"] = first["first_chunk_latency_s"]
        stats["steady_fps"] = first["steady_fps"]
        stats["chunks"] = first["chunks"]
        if torch.cuda.is_available():
            stats["cuda_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
        if self.is_writer:
            if all_latents:
                from safetensors.torch import save_file

                save_file(
                    {k: v.detach().float().cpu().contiguous() for k, v in all_latents.items()},
                    str(run_dir / "latents.safetensors"),
                )
            (run_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
            logger.info(
                f"wrote {run_dir} (first chunk {stats['first_chunk_latency_s']:.2f} s, "
                f"steady {stats['steady_fps'] or float('nan'):.2f} FPS)"
            )
        return stats

    def _cp_layout(self, pipeline: Any) -> dict[str, Any]:
        layout: dict[str, Any] = {"cp_size": self.context.world_size}
        transformer = getattr(getattr(pipeline, "diffusion_model", None), "transformer", None)
        for attribute in ("cp_size", "ulysses_size", "ring_size"):
            value = getattr(transformer, attribute, None)
            if isinstance(value, int):
                layout[attribute] = value
        return layout

    def _progress(self, total: int, prompt: str):
        if not self.is_writer or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=prompt[:40], unit="chunk", file=sys.stderr)

    def _rollout(
        self, pipeline: Any, prompt: str, video_path: Path, latent_height: int, latent_width: int
    ):
        import torch
        from loguru import logger

        from flashdreams.runner.video import Mp4Writer, video_to_uint8_frames

        config = self.config
        image = self.first_frame(config.height, config.width)
        if image is not None:
            image = image.to(self.context.device)
        writer = Mp4Writer(video_path, fps=config.fps) if self.is_writer else None
        progress = self._progress(config.num_chunks, prompt)
        chunks: list[dict[str, Any]] = []
        latents: list[torch.Tensor] = []
        rollout_start = time.perf_counter()
        first_chunk_latency_s = float("nan")
        log_every = max(1, config.num_chunks // 10)
        try:
            cache = pipeline.initialize_cache(
                text=[prompt], image=image, height=latent_height, width=latent_width
            )
            for index in range(config.num_chunks):
                t0 = time.perf_counter()
                video = pipeline.generate(index, cache)
                if config.save_latents:
                    latent = self._chunk_latent(pipeline, cache)
                    if latent is not None:
                        latents.append(latent.detach().float().cpu())
                t1 = time.perf_counter()
                num_frames = 0
                if writer is not None and video is not None:
                    frames = video_to_uint8_frames(video.reshape(-1, *video.shape[-4:])[0])
                    writer.append(frames)
                    num_frames = int(frames.shape[0])
                t2 = time.perf_counter()
                if index == 0:
                    first_chunk_latency_s = t2 - rollout_start
                profile_stats = pipeline.finalize(index, cache)
                t3 = time.perf_counter()
                chunk = {
                    "index": index,
                    "num_frames": num_frames,
                    "generate_s": t1 - t0,
                    "write_s": t2 - t1,
                    "finalize_s": t3 - t2,
                    "total_s": t3 - t0,
                }
                if profile_stats:
                    chunk["profile"] = profile_stats
                chunks.append(chunk)
                if progress is not None:
                    progress.update(1)
                elif self.is_writer and (
                    (index + 1) % log_every == 0 or index + 1 == config.num_chunks
                ):
                    logger.info(
                        f"chunk {index + 1}/{config.num_chunks}: {num_frames} frames in "
                        f"{chunk['total_s']:.2f} s"
                    )
        finally:
            if writer is not None:
                writer.close()
            if progress is not None:
                progress.close()
        steady = chunks[1:]
        steady_time = sum(chunk["total_s"] for chunk in steady)
        steady_frames = sum(chunk["num_frames"] for chunk in steady)
        rollout = {
            "num_frames": sum(chunk["num_frames"] for chunk in chunks),
            "first_chunk_latency_s": first_chunk_latency_s,
            "steady_fps": steady_frames / steady_time if steady and steady_time > 0 else None,
            "chunks": chunks,
        }
        stacked = torch.cat(latents, dim=-4) if latents else None
        return rollout, stacked
