"""Runner: the command-line-facing I/O around a streaming pipeline.

The runner reads prompts and an optional first frame, builds the pipeline
with the run's parallel plan, opens one streaming session per prompt
(:class:`~flashdreams.session.StreamingSession`: ``generate -> sink ->
finalize`` per chunk) and persists the result. Every rank steps the session
(context parallelism needs all of them); only rank 0 writes files and shows
progress. With ``runner.overlap_decode`` the session's sink decodes and writes
each chunk on a background thread
(:class:`~flashdreams.session.BackgroundDecodeSink`) while the next is denoised.

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
from typing import Any, Literal, Protocol

from flashdreams.core.distributed.plan import ParallelPlan
from flashdreams.infra.config import InstantiateConfig
from flashdreams.runner.safety import (
    OutputWriteError,
    PeerRankFailed,
    RunInterrupted,
    StopGuard,
    atomic_write_text,
    describe_write_error,
    fault_injection_from_environment,
    reserved_stats_text,
    write_stats_in_place,
)
from flashdreams.runner.startup import StartupClock, dynamo_compile_s, startup_report
from flashdreams.session import (
    ChunkSink,
    ChunkStats,
    RolloutProgress,
    RolloutStats,
    SessionPipeline,
)
from flashdreams.session.timeline import (
    PromptSwitch,
    parse_prompt_timeline,
    read_prompt_timeline_file,
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
    prompt_timeline: list[dict[str, Any]] | None = None
    """Prompt switches within one rollout: ``[{chunk: k, prompt: ...}, ...]`` in increasing
    chunk order; the prompt of the entry at chunk ``k`` is used from chunk ``k`` on. Without an
    entry at chunk 0 the rollout starts with ``prompt`` (one prompt)."""
    prompt_timeline_file: str | None = None
    """JSON-lines form of ``prompt_timeline`` (one ``{"chunk": k, "prompt": ...}`` per line);
    replaces it when set."""
    prompt_switch: Literal["recache", "none"] = "recache"
    """How a timeline switch treats the self-attention KV cache: ``recache`` recomputes it under
    the new prompt from the cached chunks' latents, ``none`` changes only the text attention."""
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
    allow_random_weights: bool = False
    """Build components whose checkpoint key is unset (``null`` or empty) with random weights
    instead of stopping before the run; for tests and demos (the tiny slugs set it). The log
    names every component left random."""
    check_finite: bool = True
    """Fail at the first AR step whose latent holds NaN/Inf (one cheap reduction per chunk)."""
    quality_check: bool = False
    """Low-precision guard (:mod:`flashdreams.runner.quality`): before the rollout, generate
    the first ``quality_check_chunks`` chunks at the reference precision (every
    ``quantization`` / ``kv_cache_dtype`` set to ``none``) and as configured, on the same
    noise; report PSNR and latent error in ``stats.json`` and stop below the thresholds.
    Also turns the black / constant frame warning of every chunk into an error."""
    quality_check_chunks: int = 1
    """AR steps compared by ``quality_check``."""
    quality_min_psnr_db: float = 20.0
    """``quality_check`` stops when the decoded frames' PSNR vs the reference is below this
    (frames in [-1, 1], peak-to-peak 2). A working int8 / fp8 mode stays well above it;
    a broken scale or a black video falls far below."""
    quality_max_latent_error: float = 0.25
    """``quality_check`` stops when the clean latents' relative L2 error vs the reference is
    above this."""
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
    config_yaml: str | None = None
    """The run's resolved config as YAML text; rank 0 saves it as ``config.yaml``."""
    stop_guard: StopGuard | None = None
    """SIGTERM / peer-failure handler of the process; the runner holds stop requests back
    while a chunk is appended to the video."""
    parallel: ParallelPlan | None = None
    """The run's parallel plan, handed to the pipeline; ``None``: the pipeline detects it
    from the world size (the reference default)."""
    startup: StartupClock | None = None
    """The launcher's start-up clock (phases before the runner); ``None``: a new clock
    starts with :meth:`Runner.run`."""


class RunnerPipeline(SessionPipeline, Protocol):
    """What the runner needs from a pipeline, beyond what a session needs."""

    spatial_compression_ratio: int
    """Pixel side / latent side of the decoder."""
    spatial_patch_size: tuple[int, int]
    """``(height, width)`` latent cells per transformer token."""

    def to(self, device: Any) -> RunnerPipeline:
        """Move to the rank's device."""

    def eval(self) -> RunnerPipeline:
        """Inference mode."""


def _cuda_graph_capture_s(pipeline: Any) -> float:
    """Seconds the pipeline's modules spent capturing CUDA graphs (those that report it)."""
    modules = pipeline.modules() if callable(getattr(pipeline, "modules", None)) else []
    return float(sum(getattr(module, "cuda_graph_capture_s", 0.0) for module in modules))


def _peak_host_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def validate_runner_config(config: RunnerConfig) -> None:
    """Check user input before anything is built or written (``ValueError`` / ``FileNotFoundError``)."""
    if config.num_chunks < 1:
        raise ValueError(f"runner.num_chunks must be >= 1, got {config.num_chunks}")
    if config.quality_check_chunks < 1:
        raise ValueError(
            f"runner.quality_check_chunks must be >= 1, got {config.quality_check_chunks}"
        )
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
    prompt_timeline(config)
    if config.image is not None:
        if not Path(config.image).is_file():
            raise FileNotFoundError(f"runner.image: no such file '{config.image}'")
        _check_image_readable(config.image)


def prompt_timeline(config: RunnerConfig) -> list[PromptSwitch] | None:
    """The validated timeline of ``config`` (``None`` without one); chunk 0 always has an entry."""
    entries = config.prompt_timeline
    source = "runner.prompt_timeline"
    if config.prompt_timeline_file is not None:
        if not Path(config.prompt_timeline_file).is_file():
            raise FileNotFoundError(
                f"runner.prompt_timeline_file: no such file '{config.prompt_timeline_file}'"
            )
        entries = read_prompt_timeline_file(config.prompt_timeline_file)
        source = f"runner.prompt_timeline_file '{config.prompt_timeline_file}'"
    if entries is None:
        return None
    timeline = parse_prompt_timeline(entries, num_chunks=config.num_chunks, source=source)
    if timeline[0].chunk == 0:
        return timeline
    if config.prompts_file is not None or not isinstance(config.prompt, str):
        raise ValueError(
            f"{source} starts at chunk {timeline[0].chunk}: the prompt before it comes from "
            "runner.prompt, which must then be one prompt (or add an entry at chunk 0)"
        )
    return [PromptSwitch(chunk=0, prompt=config.prompt), *timeline]


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
        self.rollouts: list[RolloutStats] = []
        injection = fault_injection_from_environment()  # tests only; read once per run
        self._fault_hook = (
            None if injection is None else functools.partial(injection.fire, context.rank)
        )

    # ---- inputs -------------------------------------------------------------

    def prompts(self) -> list[str]:
        """Prompts to roll out, in order."""
        timeline = prompt_timeline(self.config)
        if timeline is not None:
            return [timeline[0].prompt]
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

    def build_pipeline(self, pipeline_config: Any = None) -> RunnerPipeline:
        """Seed the global RNG and build the pipeline (``self.pipeline_config`` by default)
        on this rank's device."""
        import torch

        from flashdreams.infra.config import derive_config

        pipeline_config = pipeline_config or self.pipeline_config
        if self.config.profile:
            pipeline_config = derive_config(pipeline_config, enable_sync_and_profile=True)
        torch.manual_seed(self.config.seed)
        pipeline = pipeline_config.setup(parallel=self.context.parallel)
        return pipeline.to(self.context.device).eval()

    def _latent_size(self, pipeline: RunnerPipeline, height: int, width: int) -> tuple[int, int]:
        """Latent (height, width); ``ValueError`` naming sizes that work otherwise."""
        ratio = pipeline.spatial_compression_ratio
        patch_height, patch_width = pipeline.spatial_patch_size
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

    def _check_overlap_support(self, pipeline: RunnerPipeline) -> None:
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

    # ---- run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Roll out every prompt; returns the stats that rank 0 writes to ``stats.json``.

        On SIGTERM or an error after chunks were written, rank 0 still closes the
        video (so it plays) and writes ``stats.json`` with ``status`` set to
        ``interrupted`` or ``failed`` and the last completed chunk; then the
        exception propagates.
        """
        from loguru import logger

        started = time.perf_counter()
        clock = self.context.startup or StartupClock.begin()
        prompts = self.prompts()
        plan = self.context.parallel
        if plan is not None and plan.is_decode_rank:
            return self._run_decode_rank(len(prompts))
        self._prepare_run_dir()
        quality_reference = (
            self._quality_reference(prompts[0]) if self.config.quality_check else None
        )
        pipeline = self.build_pipeline()
        build_s = time.perf_counter() - started
        clock.mark("build")
        logger.info(f"built pipeline '{self.pipeline_config.name}' in {build_s:.2f} s")
        if self.config.overlap_decode:
            self._check_overlap_support(pipeline)
        latent_size = self._latent_size(pipeline, self.config.height, self.config.width)
        stats: dict[str, Any] = {
            "status": "running",
            "pipeline": self.pipeline_config.name,
            "world_size": self.context.world_size,
            "cp_layout": self._cp_layout(),
            "device": str(self.context.device),
            "build_s": build_s,
        }
        diffusion_model = getattr(pipeline, "diffusion_model", None)
        if diffusion_model is not None and hasattr(diffusion_model, "before_denoising_step"):
            diffusion_model.before_denoising_step = self._check_stop_between_steps
        if self.config.quality_check:
            stats["quality_check"] = self._quality_check(
                pipeline, prompts[0], latent_size, quality_reference
            )
        try:
            rollouts_started_at = clock.now()
            all_latents = self._run_prompts(pipeline, prompts, latent_size)
        except BaseException as error:
            self._record_failure(stats, error, started)
            raise
        first = self.rollouts[0]
        stats["startup"] = startup_report(
            clock,
            component_load_s=dict(getattr(pipeline, "load_times", {})),
            first_chunk_s=first.first_chunk_latency_s,
            first_frame_at_s=rollouts_started_at + first.first_chunk_latency_s,
            compile_s=dynamo_compile_s(),
            cuda_graph_capture_s=_cuda_graph_capture_s(pipeline),
        )
        self._record_success(stats, all_latents, started)
        return stats

    def _prepare_run_dir(self) -> None:
        """Rank 0: create the run directory and save the config."""
        if not self.is_writer:
            return
        run_dir = self.context.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.context.config_yaml is not None:
            self._write_file(run_dir / "config.yaml", self.context.config_yaml)
        # Holds the disk space the final stats need, should the disk fill up meanwhile.
        self._write_file(run_dir / "stats.json", reserved_stats_text(self.pipeline_config.name))

    def _run_prompts(
        self, pipeline: RunnerPipeline, prompts: list[str], latent_size: tuple[int, int]
    ) -> dict[str, Any]:
        """One rollout per prompt; returns the kept latents by safetensors key."""
        all_latents: dict[str, Any] = {}
        for prompt_index, prompt in enumerate(prompts):
            self.progress.prompt_index = prompt_index
            self.progress.last_completed_chunk = None
            single = len(prompts) == 1
            name = "video.mp4" if single else f"video_{prompt_index:03d}.mp4"
            with self._deferred_stop():
                latents = self._rollout(pipeline, prompt, name, latent_size)
            if latents is not None:
                all_latents["latents" if single else f"latents_{prompt_index:03d}"] = latents
        return all_latents

    def _record_failure(self, stats: dict[str, Any], error: BaseException, started: float) -> None:
        """Rank 0, after chunks were written: ``stats.json`` says interrupted / failed."""
        from loguru import logger

        if not (self.is_writer and self.progress.num_chunks_written > 0):
            return
        guard = self.context.stop_guard
        interrupted = isinstance(error, RunInterrupted) or (guard is not None and guard.interrupted)
        stats["status"] = "interrupted" if interrupted else "failed"
        stats["error"] = f"{type(error).__name__}: {error}"
        if self.progress.stop_latency_s is not None:
            stats["stop_latency_s"] = self.progress.stop_latency_s
        self._finish_stats(stats, started)
        self._write_stats(stats)
        logger.warning(
            f"run {stats['status']}: {self.progress.num_chunks_written} chunk(s) kept in "
            f"{self.context.run_dir} (last completed AR step {self.progress.last_completed_chunk})"
        )

    def _record_success(
        self, stats: dict[str, Any], all_latents: dict[str, Any], started: float
    ) -> None:
        import torch
        from loguru import logger

        self.progress.stage = "done"
        stats["status"] = "completed"
        self._finish_stats(stats, started)
        first = self.rollouts[0]
        stats["first_chunk_latency_s"] = first.first_chunk_latency_s
        stats["steady_fps"] = first.steady_fps
        stats["chunks"] = [chunk.to_dict() for chunk in first.chunks]
        if torch.cuda.is_available():
            stats["cuda_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
        if not self.is_writer:
            return
        if all_latents:
            from safetensors.torch import save_file

            path = self.context.run_dir / "latents.safetensors"
            try:
                save_file(
                    {k: v.detach().float().cpu().contiguous() for k, v in all_latents.items()},
                    str(path),
                )
            except OSError as error:
                path.unlink(missing_ok=True)
                raise OutputWriteError(describe_write_error(path, error)) from None
        self._write_stats(stats)  # last: its presence with status "completed" marks success
        steady = (
            f"steady {stats['steady_fps']:.2f} FPS"
            if stats["steady_fps"]
            else "no steady FPS with one chunk"
        )
        logger.info(
            f"wrote {self.context.run_dir} (first chunk {stats['first_chunk_latency_s']:.2f} s, "
            f"{steady})"
        )

    # ---- quality guard (runner.quality_check) ------------------------------------------------

    def _first_chunks(self, pipeline: RunnerPipeline, prompt: str, latent_size: tuple[int, int]):
        """The first ``quality_check_chunks`` chunks of a fresh session (``None`` off the
        output rank); the global and model RNGs are left as they were."""
        import torch

        from flashdreams.runner.quality import generate_first_chunks

        config = self.config
        image = self.first_frame(config.height, config.width)
        # Random-weight encoders are built from the global RNG on first use: restore it after.
        cpu_rng = torch.random.get_rng_state()
        cuda_rngs = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        outputs = generate_first_chunks(
            pipeline,
            num_chunks=min(config.quality_check_chunks, config.num_chunks),
            text=[prompt],
            image=None if image is None else image.to(self.context.device),
            height=latent_size[0],
            width=latent_size[1],
        )
        torch.random.set_rng_state(cpu_rng)
        if cuda_rngs is not None:
            torch.cuda.set_rng_state_all(cuda_rngs)
        diffusion_model = getattr(pipeline, "diffusion_model", None)
        if diffusion_model is not None and hasattr(diffusion_model, "reset_rng"):
            diffusion_model.reset_rng()  # the rollout draws the noise it would without the check
        return outputs

    def _quality_reference(self, prompt: str):
        """Build the reference-precision pipeline, run the first chunks, free it."""
        import gc

        import torch
        from loguru import logger

        from flashdreams.runner.quality import reference_precision_config

        logger.info("quality check: generating the first chunk(s) at the reference precision")
        reference_pipeline = self.build_pipeline(reference_precision_config(self.pipeline_config))
        latent_size = self._latent_size(reference_pipeline, self.config.height, self.config.width)
        outputs = self._first_chunks(reference_pipeline, prompt, latent_size)
        del reference_pipeline
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return outputs

    def _quality_check(
        self,
        pipeline: RunnerPipeline,
        prompt: str,
        latent_size: tuple[int, int],
        reference: Any,
    ) -> dict[str, Any] | None:
        """Compare the configured pipeline's first chunks with ``reference``; every rank
        raises :class:`~flashdreams.runner.quality.QualityCheckError` alike on failure."""
        import torch.distributed as dist
        from loguru import logger

        from flashdreams.runner.quality import (
            QualityCheckError,
            compare_with_reference,
            low_precision_settings,
        )

        config = self.config
        outputs = self._first_chunks(pipeline, prompt, latent_size)
        report, failure = None, None
        if outputs is not None and reference is not None:
            try:
                report = compare_with_reference(
                    outputs,
                    reference,
                    min_psnr_db=config.quality_min_psnr_db,
                    max_latent_error=config.quality_max_latent_error,
                    settings=low_precision_settings(self.pipeline_config),
                )
            except QualityCheckError as error:
                failure = str(error)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = [failure]
            dist.broadcast_object_list(shared, src=0)
            failure = shared[0]
        if failure is not None:
            raise QualityCheckError(failure)
        if report is not None:
            logger.info(
                f"quality check: PSNR {report['psnr_db']:.1f} dB, latent relative error "
                f"{report['latent_relative_error']:.3g} vs the reference precision"
            )
        return report

    def _finish_stats(self, stats: dict[str, Any], started: float) -> None:
        stats["prompt_index"] = self.progress.prompt_index
        stats["last_completed_chunk"] = self.progress.last_completed_chunk
        stats["num_chunks_written"] = self.progress.num_chunks_written
        stats["total_s"] = time.perf_counter() - started
        stats["peak_host_memory_mib"] = _peak_host_memory_mib()
        stats["rollouts"] = [rollout.to_dict() for rollout in self.rollouts]
        if stats["status"] != "completed" and self.rollouts:
            stats["chunks"] = stats["rollouts"][-1]["chunks"]

    def _write_stats(self, stats: dict[str, Any]) -> None:
        """Atomically; on a full disk in place, into the space reserved at the start."""
        path = self.context.run_dir / "stats.json"
        try:
            atomic_write_text(path, json.dumps(stats, indent=2) + "\n")
        except OSError as error:
            if not write_stats_in_place(path, stats):
                raise OutputWriteError(describe_write_error(path, error)) from None

    @staticmethod
    def _write_file(path: Path, text: str) -> None:
        try:
            atomic_write_text(path, text)
        except OSError as error:
            raise OutputWriteError(describe_write_error(path, error)) from None

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
        plan = self.context.parallel
        # parallel.decode=dedicated: the DiT ranks agree among themselves; the decode rank
        # hears of the stop from rank 0 (DedicatedDecodeSink.close).
        num_ranks = self.context.world_size if plan is None else plan.num_dit_ranks
        if num_ranks > 1:
            import torch
            import torch.distributed as dist

            group = None if plan is None else plan.dit_group
            flag = torch.tensor([signal_number], device=self.context.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            signal_number = int(flag.item())
        if signal_number:
            if guard.received_at is not None:
                self.progress.stop_latency_s = time.monotonic() - guard.received_at
            # A signal another rank received is this rank's stop too (under
            # parallel.decode=dedicated rank 0 passes it on to the decode rank).
            guard.note_stop(signal_number)
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

    # ---- one rollout -------------------------------------------------------------------------

    def _make_sink(self, pipeline: RunnerPipeline, writer: Any) -> ChunkSink:
        """The inline sink; the background one with ``runner.overlap_decode``; the
        row-parallel one with ``parallel.decode=parallel`` on several ranks; the one that
        hands chunks to the decode rank with ``parallel.decode=dedicated``. Rank 0 writes."""
        from flashdreams.runner.quality import flag_frames
        from flashdreams.session import BackgroundDecodeSink, InlineDecodeSink

        checks = dict(
            check_finite=self.config.check_finite,
            frame_check=functools.partial(flag_frames, stop=self.config.quality_check),
        )
        plan = self.context.parallel
        decode_plan = "rank0" if plan is None else plan.decode
        from flashdreams.runner.decode_plans import decode_plan_conflict

        conflict = decode_plan_conflict(decode_plan, self.config)
        if conflict is not None:
            raise ValueError(conflict)
        if decode_plan == "dedicated":
            return self._dedicated_decode_sink(writer, checks)
        decode_in_parallel = decode_plan == "parallel"
        if self.config.overlap_decode:
            return BackgroundDecodeSink(writer, device=self.context.device, **checks)
        if decode_in_parallel and self.context.world_size > 1:
            from flashdreams.runner.decode_plans import RowParallelDecodeSink

            decoder = getattr(pipeline, "decoder", None)
            return RowParallelDecodeSink(writer, decoder, **checks)
        return InlineDecodeSink(writer, **checks)

    def _dedicated_decode_sink(self, writer: Any, checks: dict[str, Any]) -> ChunkSink:
        """``parallel.decode=dedicated`` on a DiT rank; the output rank talks to the decode rank."""
        from flashdreams.runner.decode_plans import DecodeLink, DedicatedDecodeSink

        plan = self.context.parallel
        assert plan is not None and plan.decode_rank is not None
        guard = self.context.stop_guard
        link = DecodeLink(plan.decode_rank, self.context.device) if plan.holds_output else None
        return DedicatedDecodeSink(
            writer,
            link,
            stop_signal=(lambda: None) if guard is None else (lambda: guard.stop_signal),
            note_stop=(lambda signal_number: None) if guard is None else guard.note_stop,
            **checks,
        )

    def build_decoder(self) -> Any:
        """The pipeline's decoder alone, built as :meth:`build_pipeline` builds it (same seed,
        the encoder built first: random weights equal the full pipeline's)."""
        import torch

        config = self.pipeline_config
        torch.manual_seed(self.config.seed)
        if config.encoder is not None:
            config.encoder.setup()
        decoder = config.decoder.setup() if config.decoder is not None else None
        if decoder is None:
            raise ValueError(
                f"parallel.decode=dedicated needs a pipeline with a decoder; "
                f"'{config.name}' has none"
            )
        return decoder.to(self.context.device).eval()

    def _run_decode_rank(self, num_prompts: int) -> dict[str, Any]:
        """The last rank under ``parallel.decode=dedicated``: decode every chunk rank 0 sends.

        Takes part in no collective of the DiT ranks; each rollout ends with rank 0's
        ``END`` (finished) or ``STOP`` (stopped early), then this rank stops the same way.
        """
        from loguru import logger

        from flashdreams.runner.decode_plans import DecodeLink, decode_on_dedicated_rank
        from flashdreams.runner.safety import FailureReport, PeerRankFailed

        decoder = self.build_decoder()
        logger.info(f"rank {self.context.rank}: dedicated decode rank")
        link = DecodeLink(0, self.context.device)
        guard = self.context.stop_guard
        stop_signal = (lambda: None) if guard is None else (lambda: guard.stop_signal)
        num_chunks = 0
        for prompt_index in range(num_prompts):
            self.progress.prompt_index = prompt_index
            self.progress.stage = "decode"
            with self._deferred_stop():
                kind, signal_number, num_chunks = decode_on_dedicated_rank(
                    decoder, link, stop_signal=stop_signal, fault_hook=self._decode_fault
                )
            if kind == DecodeLink.STOP:
                where = f"after decoding {num_chunks} chunk(s) of prompt {prompt_index}"
                if signal_number:
                    raise RunInterrupted(signal_number, where)
                raise PeerRankFailed(
                    FailureReport(0, None, "rollout", f"the DiT ranks stopped {where}")
                )
        self.progress.stage = "done"
        return {"status": "completed", "decode_rank": self.context.rank}

    def _decode_fault(self, index: int, stage: str) -> None:
        self.progress.autoregressive_index = index
        if self._fault_hook is not None:
            self._fault_hook(index, stage)

    def _rollout(
        self, pipeline: RunnerPipeline, prompt: str, name: str, latent_size: tuple[int, int]
    ) -> Any:
        """One prompt's session, stepped to ``runner.num_chunks``; returns the kept latents."""
        from flashdreams.session import RolloutStats, StreamingSession

        config = self.config
        image = self.first_frame(config.height, config.width)
        if image is not None:
            image = image.to(self.context.device)
        writer = None
        if self.is_writer:
            from flashdreams.runner.video import Mp4Writer

            writer = Mp4Writer(self.context.run_dir / name, fps=config.fps)
        sink = self._make_sink(pipeline, writer)
        rollout = RolloutStats(prompt=prompt, video=name)
        self.rollouts.append(rollout)
        reporter = _ChunkReporter(config.num_chunks, prompt, enabled=self.is_writer)
        session = None
        failed = False
        try:
            switches = {entry.chunk: entry.prompt for entry in prompt_timeline(config) or []}
            switches.pop(0, None)
            session = StreamingSession.open(
                pipeline,
                sink,
                text=[prompt],
                image=image,
                height=latent_size[0],
                width=latent_size[1],
                keep_encoders=bool(switches),
                stats=rollout,
                progress=self.progress,
                keep_latents=config.save_latents,
                check_finite=config.check_finite,
                critical=self._critical,
                on_chunk=reporter,
                fault_hook=self._fault_hook,
                stop_hook=self._check_stop,
            )
            for index in range(config.num_chunks):
                if index in switches:
                    session.switch_prompt(
                        [switches[index]], recache=config.prompt_switch == "recache"
                    )
                session.step()
            session.finish()
        except BaseException as error:
            failed = True
            if isinstance(error, PeerRankFailed):
                sink.abandon()  # do not wait on ranks that may be gone
            raise
        finally:
            latents = None
            try:
                latents = session.close() if session is not None else sink.close()
            except OutputWriteError:
                if not failed:  # else the first failure is the one to report
                    raise
            finally:
                reporter.close()
                if writer is not None:  # chunks that never reached a full disk do not count
                    lost = writer.num_chunks_appended - writer.num_chunks_on_disk
                    self.progress.num_chunks_written -= lost
        return latents


class _ChunkReporter:
    """Progress of a rollout on rank 0: a bar on a terminal, else a log line every ~10%."""

    def __init__(self, total: int, prompt: str, *, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.log_every = max(1, total // 10)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=prompt[:40], unit="chunk", file=sys.stderr)

    def __call__(self, chunk: ChunkStats) -> None:
        from loguru import logger

        if self.bar is not None:
            self.bar.update(1)
            return
        index = chunk.index
        if not self.enabled or ((index + 1) % self.log_every and index + 1 != self.total):
            return
        if chunk.decode_s is not None:
            timing = (
                f"(decode {chunk.decode_s:.2f} s, write {chunk.write_s:.2f} s in the background)"
            )
        else:
            timing = f"in {chunk.total_s:.2f} s"
        logger.info(f"chunk {index + 1}/{self.total}: {chunk.num_frames} frames {timing}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
