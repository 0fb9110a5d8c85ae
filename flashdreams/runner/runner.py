"""Runner: the command-line-facing I/O around a streaming pipeline.

The runner reads prompts and an optional first frame, builds the pipeline,
drives the ``initialize_cache -> (generate, write, finalize) * num_chunks``
rollout, and persists the result. Every rank runs the rollout (context
parallelism needs all of them); only rank 0 writes files and shows progress.
With ``runner.overlap_decode`` rank 0 decodes and writes each chunk on a
background thread (:mod:`flashdreams.runner.overlap`) while it denoises the next.

Run directory layout (written by rank 0)::

    video.mp4            decoded video, appended chunk by chunk
    config.yaml          resolved config of the run (reloads to an equal config)
    stats.json           status (completed / interrupted / failed), per-chunk timings,
                         first-chunk latency, steady FPS, memory, layout
    latents.safetensors  clean latents of all chunks (runner.save_latents=true)
    log_rank<r>.txt      one log file per rank
"""

from __future__ import annotations

import functools
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashdreams.core.distributed.plan import ParallelPlan
from flashdreams.infra.config import InstantiateConfig
from flashdreams.runner.safety import (
    RunInterrupted,
    StopGuard,
    atomic_write_text,
    check_finite,
    maybe_inject_fault,
)


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
    """Run directory; ``None`` means ``outputs/<slug>/<time>/`` under the working directory.
    A directory that already holds a run is refused unless ``overwrite`` is set."""
    overwrite: bool = False
    """Replace an earlier run's files in ``output_dir`` (only those files are deleted)."""
    fps: float = 16.0
    """Frame rate written into the mp4."""
    save_latents: bool = False
    """Also write the clean latents of all chunks to ``latents.safetensors``."""
    profile: bool = False
    """Time every stage of every AR step (sets ``pipeline.enable_sync_and_profile``)."""
    check_finite: bool = True
    """Fail at the first AR step whose latent holds NaN/Inf (one cheap reduction per chunk)."""
    overlap_decode: bool = False
    """Decode and write chunk ``i`` on a background thread (rank 0 only) while the main thread
    finalizes it and denoises chunk ``i + 1``; on CUDA the decoder runs on its own stream. The
    video and latents are identical to the sequential order; ``stats.json`` then times each
    chunk's ``decode_s`` / ``write_s`` separately. Needs a pipeline with ``generate_latent``
    and ``decode_latent`` (every ``StreamInferencePipeline``)."""


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
    stop_guard: StopGuard | None = None
    """SIGTERM / peer-failure handler of the process; the runner holds stop requests back
    while a chunk is appended to the video."""
    parallel: ParallelPlan | None = None
    """The run's parallel plan, handed to the pipeline; ``None``: the pipeline detects it
    from the world size (the reference default)."""


@dataclass
class RolloutProgress:
    """Where the rollout is; read by the launcher to report failures and by ``stats.json``."""

    prompt_index: int = 0
    """Prompt being rolled out."""
    autoregressive_index: int | None = None
    """AR step in progress, ``None`` before the first ``generate``."""
    stage: str = "build"
    """``build``, ``initialize``, ``generate``, ``write``, ``finalize``, ``decode`` (a failed
    background decode, ``runner.overlap_decode``) or ``done``."""
    last_completed_chunk: int | None = None
    """Last AR step of the current prompt that was written and finalized."""
    num_chunks_written: int = 0
    """Chunks appended to any video by this run (rank 0)."""
    stop_latency_s: float | None = None
    """Seconds from a stop signal to the safe point where the rollout stopped."""


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
    if not math.isfinite(config.fps) or config.fps <= 0:
        raise ValueError(f"runner.fps must be a positive number, got {config.fps}")
    if not 0 <= config.seed < 2**63:
        raise ValueError(f"runner.seed must be between 0 and 2**63 - 1, got {config.seed}")
    if config.prompts_file is not None:
        if not Path(config.prompts_file).is_file():
            raise FileNotFoundError(f"runner.prompts_file: no such file '{config.prompts_file}'")
        read_prompts_file(config.prompts_file)
    if config.image is not None:
        if not Path(config.image).is_file():
            raise FileNotFoundError(f"runner.image: no such file '{config.image}'")
        _check_image_readable(config.image)


def read_prompts_file(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (a byte-order mark is dropped)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"runner.prompts_file: '{path}' is not UTF-8 text (byte {error.start}: "
            f"{error.reason}); save it as UTF-8"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_image_readable(path: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"runner.image: '{path}' is too large to read safely ({error}); give an image "
            "near the video size"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"runner.image: cannot read '{path}' as an image ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}); give a PNG or JPEG file"
        ) from None


def _nearby_multiples(value: int, multiple: int) -> str:
    lower = (value // multiple) * multiple
    choices = [c for c in (lower, lower + multiple) if c > 0]
    return " or ".join(str(c) for c in choices)


class Runner:
    """Runs one pipeline config for the prompts of a :class:`RunnerConfig`."""

    def __init__(self, config: RunnerConfig, *, pipeline_config: Any, context: RunContext) -> None:
        self.config = config
        self.pipeline_config = pipeline_config
        self.context = context
        self.is_writer = context.rank == 0
        validate_runner_config(config)
        self.progress = RolloutProgress()
        """Where the rollout is (read by the launcher when a run fails)."""
        self.rollouts: list[dict[str, Any]] = []

    # ---- inputs -------------------------------------------------------------

    def prompts(self) -> list[str]:
        """Prompts to roll out, in order."""
        if self.config.prompts_file is not None:
            prompts = read_prompts_file(self.config.prompts_file)
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
        pipeline = pipeline_config.setup(parallel=self.context.parallel)
        return pipeline.to(self.context.device).eval()

    @staticmethod
    def _spatial_patch_size(pipeline: Any) -> tuple[int, int]:
        """The transformer's (height, width) patch size, (1, 1) when it does not say."""
        diffusion_model = getattr(pipeline, "diffusion_model", None)
        config = getattr(getattr(diffusion_model, "transformer", None), "config", None)
        for holder in (config, getattr(config, "transformer_high_noise", None)):
            patch_size = getattr(getattr(holder, "network", None), "patch_size", None)
            if patch_size is not None:
                return int(patch_size[-2]), int(patch_size[-1])
        return 1, 1

    @classmethod
    def _latent_size(cls, pipeline: Any, height: int, width: int) -> tuple[int, int]:
        """Latent (height, width); ``ValueError`` naming sizes that work otherwise."""
        decoder = getattr(pipeline, "decoder", None)
        ratio = int(getattr(decoder, "spatial_compression_ratio", 1) or 1)
        patch_height, patch_width = cls._spatial_patch_size(pipeline)
        multiple_height, multiple_width = ratio * patch_height, ratio * patch_width
        problems = []
        if height % multiple_height:
            problems.append(
                f"runner.height={height} is not a multiple of {multiple_height} "
                f"(try {_nearby_multiples(height, multiple_height)})"
            )
        if width % multiple_width:
            problems.append(
                f"runner.width={width} is not a multiple of {multiple_width} "
                f"(try {_nearby_multiples(width, multiple_width)})"
            )
        if problems:
            raise ValueError(
                "; ".join(problems) + f". Pixel sizes must be multiples of the VAE's spatial "
                f"compression {ratio} x the transformer's patch size "
                f"{patch_height}x{patch_width}"
            )
        return height // ratio, width // ratio

    def _check_overlap_support(self, pipeline: Any) -> None:
        missing = [
            name
            for name in ("generate_latent", "decode_latent")
            if not callable(getattr(pipeline, name, None))
        ]
        if missing:
            raise ValueError(
                f"runner.overlap_decode=true needs a pipeline with generate_latent() and "
                f"decode_latent() (every StreamInferencePipeline has them); pipeline "
                f"'{self.pipeline_config.name}' ({type(pipeline).__name__}) lacks "
                f"{' and '.join(missing)}. Set runner.overlap_decode=false"
            )

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
        """Roll out every prompt; returns the stats that rank 0 writes to ``stats.json``.

        On SIGTERM or an error after chunks were written, rank 0 still closes the
        video (so it plays) and writes ``stats.json`` with ``status`` set to
        ``interrupted`` or ``failed`` and the last completed chunk; then the
        exception propagates.
        """
        import torch
        from loguru import logger

        context = self.context
        run_dir = context.run_dir
        prompts = self.prompts()
        if self.is_writer:
            run_dir.mkdir(parents=True, exist_ok=True)
            if context.resolved_config is not None:
                from flashdreams.launch.run_config import run_config_yaml

                atomic_write_text(run_dir / "config.yaml", run_config_yaml(context.resolved_config))

        started = time.perf_counter()
        pipeline = self.build_pipeline()
        build_s = time.perf_counter() - started
        logger.info(f"built pipeline '{self.pipeline_config.name}' in {build_s:.2f} s")
        latent_height, latent_width = self._latent_size(
            pipeline, self.config.height, self.config.width
        )
        stats: dict[str, Any] = {
            "status": "running",
            "pipeline": self.pipeline_config.name,
            "world_size": context.world_size,
            "cp_layout": self._cp_layout(),
            "device": str(context.device),
            "build_s": build_s,
        }

        worker = None
        if self.config.overlap_decode:
            self._check_overlap_support(pipeline)
            if self.is_writer:
                from flashdreams.runner.overlap import BackgroundChunkWorker

                worker = BackgroundChunkWorker(context.device)
        all_latents: dict[str, torch.Tensor] = {}
        diffusion_model = getattr(pipeline, "diffusion_model", None)
        if diffusion_model is not None and hasattr(diffusion_model, "before_denoising_step"):
            diffusion_model.before_denoising_step = self._check_stop_between_steps
        try:
            for prompt_index, prompt in enumerate(prompts):
                self.progress.prompt_index = prompt_index
                self.progress.last_completed_chunk = None
                name = "video.mp4" if len(prompts) == 1 else f"video_{prompt_index:03d}.mp4"
                rollout: dict[str, Any] = {"prompt": prompt, "video": name, "chunks": []}
                self.rollouts.append(rollout)
                with self._deferred_stop():
                    latents = self._rollout(
                        pipeline, prompt, run_dir / name, latent_height, latent_width, rollout,
                        worker,
                    )  # fmt: skip
                if latents is not None:
                    key = "latents" if len(prompts) == 1 else f"latents_{prompt_index:03d}"
                    all_latents[key] = latents
        except BaseException as error:
            if self.is_writer and self.progress.num_chunks_written > 0:
                interrupted = isinstance(error, RunInterrupted) or (
                    context.stop_guard is not None and context.stop_guard.interrupted
                )
                stats["status"] = "interrupted" if interrupted else "failed"
                stats["error"] = f"{type(error).__name__}: {error}"
                if self.progress.stop_latency_s is not None:
                    stats["stop_latency_s"] = self.progress.stop_latency_s
                self._finish_stats(stats, started)
                self._write_stats(stats)
                logger.warning(
                    f"run {stats['status']}: {self.progress.num_chunks_written} chunk(s) kept in "
                    f"{run_dir} (last completed AR step {self.progress.last_completed_chunk})"
                )
            raise
        finally:
            if worker is not None:
                worker.close()

        self.progress.stage = "done"
        stats["status"] = "completed"
        self._finish_stats(stats, started)
        first = self.rollouts[0]
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
            self._write_stats(stats)  # last: its presence with status "completed" marks success
            steady = (
                f"steady {stats['steady_fps']:.2f} FPS"
                if stats["steady_fps"]
                else "no steady FPS with one chunk"
            )
            logger.info(
                f"wrote {run_dir} (first chunk {stats['first_chunk_latency_s']:.2f} s, {steady})"
            )
        return stats

    def _finish_stats(self, stats: dict[str, Any], started: float) -> None:
        stats["prompt_index"] = self.progress.prompt_index
        stats["last_completed_chunk"] = self.progress.last_completed_chunk
        stats["num_chunks_written"] = self.progress.num_chunks_written
        stats["total_s"] = time.perf_counter() - started
        stats["peak_host_memory_mib"] = _peak_host_memory_mib()
        stats["rollouts"] = self.rollouts
        if stats["status"] != "completed" and self.rollouts:
            stats["chunks"] = self.rollouts[-1]["chunks"]

    def _write_stats(self, stats: dict[str, Any]) -> None:
        atomic_write_text(self.context.run_dir / "stats.json", json.dumps(stats, indent=2) + "\n")

    def _deferred_stop(self):
        """During the rollout a stop signal is acted on at the next safe point (see
        :meth:`_check_stop`), not wherever the main thread happens to be."""
        from contextlib import nullcontext

        guard = self.context.stop_guard
        return guard.deferred() if guard is not None else nullcontext()

    def _check_stop(self, where: str) -> None:
        """Raise :class:`RunInterrupted` when a stop signal arrived on any rank.

        Every rank calls this at the same points, so with several ranks they agree (one
        small all-reduce) and all stop at the same place, none left inside a collective.
        """
        guard = self.context.stop_guard
        if guard is None:
            return
        signal_number = guard.stop_signal or 0
        if self.context.world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([signal_number], device=self.context.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signal_number = int(flag.item())
        if signal_number:
            if guard.received_at is not None:
                self.progress.stop_latency_s = time.monotonic() - guard.received_at
            raise RunInterrupted(signal_number, where)

    def _check_stop_between_steps(self, autoregressive_index: int, step_index: int) -> None:
        self._check_stop(
            f"before denoising step {step_index} of AR step {autoregressive_index}; "
            f"that chunk was dropped"
        )

    def _critical(self):
        """Hold SIGTERM back while a chunk is appended (no half chunks in the video)."""
        from contextlib import nullcontext

        guard = self.context.stop_guard
        return guard.critical() if guard is not None else nullcontext()

    def _cp_layout(self) -> dict[str, Any]:
        """The parallel layout for ``stats.json``, from the plan the run was given."""
        if self.context.parallel is None:
            return {"world_size": self.context.world_size, "cp_size": self.context.world_size}
        return self.context.parallel.describe()

    def _progress(self, total: int, prompt: str):
        if not self.is_writer or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=prompt[:40], unit="chunk", file=sys.stderr)

    def _rollout(
        self,
        pipeline: Any,
        prompt: str,
        video_path: Path,
        latent_height: int,
        latent_width: int,
        rollout: dict[str, Any],
        worker: Any = None,
    ):
        """One prompt's rollout; fills ``rollout`` as it goes; returns the stacked latents.

        With a ``worker`` (:class:`~flashdreams.runner.overlap.BackgroundChunkWorker`,
        ``runner.overlap_decode`` on rank 0) each chunk's latent is handed to it
        for decoding and writing, and this thread goes on with ``finalize``.
        """
        import torch
        from loguru import logger

        from flashdreams.runner.video import Mp4Writer, video_to_uint8_frames

        config = self.config
        rank = self.context.rank
        overlap = config.overlap_decode
        progress_state = self.progress
        image = self.first_frame(config.height, config.width)
        if image is not None:
            image = image.to(self.context.device)
        writer = Mp4Writer(video_path, fps=config.fps) if self.is_writer else None
        progress = self._progress(config.num_chunks, prompt)
        chunks: list[dict[str, Any]] = rollout["chunks"]
        latents: list[torch.Tensor] = []
        rollout_start = time.perf_counter()
        rollout["first_chunk_latency_s"] = float("nan")
        log_every = max(1, config.num_chunks // 10)
        # Overlap mode: AR steps finalized here and written by the worker.
        overlap_state: dict[str, int | None] = {"finalized": None, "written": None}

        def report_written(index: int, chunk: dict[str, Any]) -> None:
            if progress is not None:
                progress.update(1)
            elif self.is_writer and (
                (index + 1) % log_every == 0 or index + 1 == config.num_chunks
            ):
                if overlap:  # on the worker: the main thread may still be finalizing
                    timing = (
                        f"(decode {chunk['decode_s']:.2f} s, write {chunk['write_s']:.2f} s "
                        "in the background)"
                    )
                else:
                    timing = f"in {chunk['total_s']:.2f} s"
                logger.info(
                    f"chunk {index + 1}/{config.num_chunks}: {chunk['num_frames']} frames {timing}"
                )

        def decode_and_write(latent: torch.Tensor, index: int, chunk: dict[str, Any]) -> None:
            """Overlap mode, on the worker thread: decode one chunk, check it, append it."""
            from flashdreams.infra.profiler import EventProfiler

            timer = EventProfiler(use_cuda=latent.device.type == "cuda")
            video = pipeline.decode_latent(latent, index, cache)
            timer.record("decode")
            if config.check_finite:
                check_finite(video, index)
            frames = video_to_uint8_frames(video.reshape(-1, *video.shape[-4:])[0])
            decode_s = timer.sync_and_summarize()["decode"] / 1000.0
            t_write = time.perf_counter()
            writer.append(frames)  # no stop guard here: signals reach the main thread only
            progress_state.num_chunks_written += 1
            chunk["num_frames"] = int(frames.shape[0])
            chunk["decode_s"] = decode_s
            chunk["write_s"] = time.perf_counter() - t_write
            if index == 0:
                rollout["first_chunk_latency_s"] = time.perf_counter() - rollout_start
            overlap_state["written"] = index
            report_written(index, chunk)

        def completed_chunk() -> int | None:
            finalized, written = overlap_state["finalized"], overlap_state["written"]
            if not self.is_writer:
                return finalized
            return None if finalized is None or written is None else min(finalized, written)

        try:
            progress_state.stage = "initialize"
            cache = pipeline.initialize_cache(
                text=[prompt], image=image, height=latent_height, width=latent_width
            )
            for index in range(config.num_chunks):
                progress_state.autoregressive_index = index
                self._check_stop(f"before AR step {index}")
                progress_state.stage = "generate"
                if worker is not None:
                    self._raise_worker_failure(worker)
                t0 = time.perf_counter()
                maybe_inject_fault(rank, index, "generate")
                if overlap:
                    latent = pipeline.generate_latent(index, cache)
                    video = None
                else:
                    video = pipeline.generate(index, cache)
                final_state = getattr(cache, "final_state", None)
                local_latent = getattr(final_state, "clean_latent", None)
                maybe_inject_fault(rank, index, "generate", latent=local_latent)
                if config.check_finite:
                    check_finite(local_latent, index)
                    if video is not None:
                        check_finite(video, index)
                if config.save_latents:
                    # Overlap mode already holds the gathered latent: no second gather.
                    saved = latent if overlap else self._chunk_latent(pipeline, cache)
                    if saved is not None:
                        latents.append(saved.detach().float().cpu())
                t1 = time.perf_counter()
                progress_state.stage = "write"
                maybe_inject_fault(rank, index, "write")
                chunk: dict[str, Any] = {"index": index, "num_frames": 0}
                wait_s = 0.0
                if worker is not None and latent is not None:
                    # ``latent`` is freshly allocated by generate_latent and nothing on this
                    # thread writes into it afterwards (finalize only reads the clean latent).
                    job = functools.partial(decode_and_write, latent, index, chunk)
                    try:
                        # Blocks while two chunks are pending; a stop request waits for the
                        # hand-over, so the worker's bookkeeping is never cut in half.
                        with self._critical():
                            wait_s = worker.submit(index, job, tensors=[latent])
                    except BaseException:
                        self._raise_worker_failure(worker)
                        raise
                    latent = None
                elif writer is not None and video is not None:
                    frames = video_to_uint8_frames(video.reshape(-1, *video.shape[-4:])[0])
                    with self._critical():
                        writer.append(frames)
                        progress_state.num_chunks_written += 1
                    chunk["num_frames"] = int(frames.shape[0])
                t2 = time.perf_counter()
                if index == 0 and not overlap:
                    rollout["first_chunk_latency_s"] = t2 - rollout_start
                self._check_stop(f"after AR step {index} was written")
                progress_state.stage = "finalize"
                maybe_inject_fault(rank, index, "finalize")
                profile_stats = pipeline.finalize(index, cache)
                t3 = time.perf_counter()
                chunk["generate_s"] = t1 - t0
                if overlap:
                    # The worker fills num_frames, decode_s and write_s; wait_s is the time
                    # this thread waited for it (a free slot, and the last chunk's drain).
                    chunk.update(wait_s=wait_s, finalize_s=t3 - t2, total_s=t3 - t0)
                else:
                    chunk.update(write_s=t2 - t1, finalize_s=t3 - t2, total_s=t3 - t0)
                if profile_stats:
                    chunk["profile"] = profile_stats
                chunks.append(chunk)
                if overlap:
                    overlap_state["finalized"] = index
                    progress_state.last_completed_chunk = completed_chunk()
                else:
                    progress_state.last_completed_chunk = index
                    report_written(index, chunk)
            if worker is not None:
                progress_state.stage = "write"
                drain_s = worker.drain()
                if chunks:
                    chunks[-1]["wait_s"] += drain_s
                    chunks[-1]["total_s"] += drain_s
                self._raise_worker_failure(worker)
        finally:
            if worker is not None:
                with self._critical():
                    # The worker must be idle before the video is closed; the chunks it was
                    # handed are finished (or skipped after a failed one) first.
                    worker.drain()
            if overlap:
                progress_state.last_completed_chunk = completed_chunk()
            if writer is not None:
                with self._critical():
                    writer.close()
            if progress is not None:
                progress.close()
        steady = chunks[1:]
        steady_time = sum(chunk["total_s"] for chunk in steady)
        steady_frames = sum(chunk["num_frames"] for chunk in steady)
        rollout["num_frames"] = sum(chunk["num_frames"] for chunk in chunks)
        rollout["steady_fps"] = steady_frames / steady_time if steady and steady_time > 0 else None
        return torch.cat(latents, dim=-4) if latents else None

    def _raise_worker_failure(self, worker: Any) -> None:
        """Re-raise a failed background decode in this thread, pointing the progress at it."""
        failed_index = worker.failed_autoregressive_index
        if failed_index is None:
            return
        self.progress.autoregressive_index = failed_index
        self.progress.stage = "decode"
        worker.raise_if_failed()
