"""Quality guard of the low-precision tier (``runner.quality_check=true``).

Two checks:

* :func:`frame_problem`: a decoded chunk whose frames are black, constant or non-finite.
  The runner logs a warning for every such chunk in any run, and stops the run when
  ``runner.quality_check`` is on.
* :func:`compare_with_reference`: the first ``runner.quality_check_chunks`` chunks are
  generated twice on the same noise (same seed, same random or loaded weights): once at
  the reference precision (the same pipeline with every ``quantization`` and
  ``kv_cache_dtype`` field set to ``"none"``) and once as configured. The PSNR of the
  decoded frames and the relative L2 error of the clean latents are reported in
  ``stats.json``; below ``runner.quality_min_psnr_db`` or above
  ``runner.quality_max_latent_error`` the run stops with a message naming the knobs.

The reference pipeline is built, run and freed before the configured one is built, so the
peak memory is the larger of the two, not their sum.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from flashdreams.session import (
    ChunkStats,
    InlineDecodeSink,
    ProducedChunk,
    SessionPipeline,
    StreamingSession,
)

LOW_PRECISION_FIELDS = ("quantization", "kv_cache_dtype")
"""Config fields that select a low-precision mode; ``"none"`` is the reference."""


class QualityCheckError(RuntimeError):
    """The low-precision output is too far from the reference, or frames are broken."""


def low_precision_settings(config: Any, path: str = "pipeline") -> dict[str, str]:
    """``{dotted path: value}`` of every low-precision field not set to ``"none"``."""
    found: dict[str, str] = {}
    if not dataclasses.is_dataclass(config):
        return found
    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        if field.name in LOW_PRECISION_FIELDS and isinstance(value, str) and value != "none":
            found[f"{path}.{field.name}"] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            found.update(low_precision_settings(value, f"{path}.{field.name}"))
    return found


def reference_precision_config(config: Any) -> Any:
    """A copy of the pipeline config with every low-precision field set to ``"none"``."""
    import copy

    reference = copy.deepcopy(config)

    def reset(node: Any) -> None:
        if not dataclasses.is_dataclass(node) or isinstance(node, type):
            return
        for field in dataclasses.fields(node):
            value = getattr(node, field.name, None)
            if field.name in LOW_PRECISION_FIELDS and isinstance(value, str):
                setattr(node, field.name, "none")
            else:
                reset(value)

    reset(reference)
    return reference


def frame_problem(video: torch.Tensor | None) -> str | None:
    """What is wrong with a decoded chunk ``[..., T, 3, H, W]`` in ``[-1, 1]``, or ``None``.

    Non-finite: any NaN / Inf. Black: every pixel of a frame at or below -0.95 (5% above
    black). Constant: a frame whose pixels all lie within 1e-3 of each other.
    """
    if video is None:
        return None
    frames = video.detach().float().reshape(-1, *video.shape[-3:])  # [N, 3, H, W]
    if not bool(torch.isfinite(frames).all()):
        return "non-finite pixels (NaN/Inf)"
    flat = frames.reshape(frames.shape[0], -1)
    black = flat.amax(dim=1) <= -0.95
    if bool(black.any()):
        return f"{int(black.sum())} of {flat.shape[0]} frame(s) black"
    constant = (flat.amax(dim=1) - flat.amin(dim=1)) < 1e-3
    if bool(constant.any()):
        return f"{int(constant.sum())} of {flat.shape[0]} frame(s) constant"
    return None


def flag_frames(video: torch.Tensor, index: int, *, stop: bool) -> None:
    """A session sink's frame check: warn about black / constant / non-finite frames, or
    (``stop``: ``runner.quality_check=true``) raise :class:`QualityCheckError`."""
    from loguru import logger

    problem = frame_problem(video)
    if problem is None:
        return
    message = f"AR step {index}: the decoded chunk has {problem}"
    if stop:
        raise QualityCheckError(f"{message} (runner.quality_check=true stops the run)")
    logger.warning(f"{message}; runner.quality_check=true would stop here")


def psnr_db(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of two videos in ``[-1, 1]`` (peak-to-peak 2); ``inf`` when equal."""
    mse = float((video.float() - reference.float()).pow(2).mean())
    if not math.isfinite(mse):
        return float("-inf")
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def relative_error(latent: torch.Tensor, reference: torch.Tensor) -> float:
    """``||latent - reference|| / ||reference||`` (``inf`` for a non-finite latent)."""
    error = float((latent.float() - reference.float()).norm() / reference.float().norm())
    return error if math.isfinite(error) else float("inf")


@dataclasses.dataclass
class ChunkOutputs:
    """Decoded frames and clean latents of the first chunks of one run (on CPU)."""

    videos: list[torch.Tensor]
    latents: list[torch.Tensor]


class _RecordingSink(InlineDecodeSink):
    """Keeps every decoded chunk (fp32, on CPU) instead of writing it."""

    def __init__(self) -> None:
        super().__init__(None, check_finite=False)
        self.videos: list[torch.Tensor] = []

    def deliver(self, chunk: ProducedChunk, stats: ChunkStats) -> None:
        if chunk.video is not None:
            self.videos.append(chunk.video.detach().float().cpu())
        super().deliver(chunk, stats)


def generate_first_chunks(
    pipeline: SessionPipeline, *, num_chunks: int, **open_kwargs: Any
) -> ChunkOutputs | None:
    """Step a fresh streaming session ``num_chunks`` times; ``None`` off the rank that decodes.

    ``open_kwargs`` (``text``, ``image``, ``height``, ``width``) go to
    :meth:`~flashdreams.session.StreamingSession.open`. Non-finite output is not an error
    here: the comparison reports it against the low-precision knobs.
    """
    sink = _RecordingSink()
    session = StreamingSession.open(
        pipeline, sink, keep_latents=True, check_finite=False, **open_kwargs
    )
    try:
        with torch.no_grad():
            for _ in range(num_chunks):
                session.step()
        session.finish()
    finally:
        latents = session.close()
    if not sink.videos:
        return None
    return ChunkOutputs(videos=sink.videos, latents=[] if latents is None else [latents])


def compare_with_reference(
    outputs: ChunkOutputs,
    reference: ChunkOutputs,
    *,
    min_psnr_db: float,
    max_latent_error: float,
    settings: dict[str, str],
) -> dict[str, Any]:
    """PSNR and latent error of ``outputs`` vs ``reference``; raises :class:`QualityCheckError`
    naming the low-precision knobs (``settings``) when a threshold is crossed."""
    video = torch.cat([v.reshape(-1, *v.shape[-3:]) for v in outputs.videos])
    reference_video = torch.cat([v.reshape(-1, *v.shape[-3:]) for v in reference.videos])
    psnr = psnr_db(video, reference_video)
    latent_error = float("nan")
    if outputs.latents and reference.latents:
        latent_error = relative_error(torch.cat(outputs.latents), torch.cat(reference.latents))
    problem = frame_problem(video)
    report = {
        "num_chunks": len(outputs.videos),
        "psnr_db": psnr,
        "latent_relative_error": latent_error,
        "frame_problem": problem,
        "low_precision": settings,
        "min_psnr_db": min_psnr_db,
        "max_latent_error": max_latent_error,
    }
    failures = []
    if problem is not None:
        failures.append(problem)
    if psnr < min_psnr_db:
        failures.append(f"PSNR {psnr:.1f} dB < runner.quality_min_psnr_db={min_psnr_db:g}")
    if latent_error > max_latent_error:  # nan (no latents) compares False
        failures.append(
            f"latent relative error {latent_error:.3g} > "
            f"runner.quality_max_latent_error={max_latent_error:g}"
        )
    if failures:
        knobs = ", ".join(f"{path}={value}" for path, value in settings.items()) or (
            "no low-precision mode is set: check the weights and the dtype"
        )
        raise QualityCheckError(
            f"quality check failed on the first {len(outputs.videos)} chunk(s) vs the "
            f"reference precision: {'; '.join(failures)}. Low-precision knobs: {knobs}; "
            "set them to none (or runner.quality_check=false to skip this check)"
        )
    return report
