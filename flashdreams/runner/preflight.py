"""Checks of a run's config made before any directory is created or any weight is loaded.

``flashdreams-run`` calls :func:`validate_before_work` on every rank before it joins the
process group (and, for a sweep, on every job before the first is launched); ``--cfg
job`` calls it without the checkpoint and memory checks before it prints. Problems raise
``ValueError`` / ``FileNotFoundError`` in user words.

The sizes come from the configs alone: the decoder and the transformer's network are
built on PyTorch's ``meta`` device (shapes, no memory, no checkpoint read).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REMOTE_PREFIXES = ("http://", "https://", "hf://", "s3://")
"""Checkpoint values that name a download rather than a local file."""

BUILTIN_TOKENIZER_PREFIX = "builtin:"
"""``tokenizer_path`` values that need no file (the tiny byte tokenizer)."""


@dataclass(frozen=True)
class PipelineGeometry:
    """What the sizes of a pipeline are made of, read off its config."""

    spatial_compression: int
    """Pixels per latent pixel along height and width (8 for the Wan 2.1 VAE)."""
    temporal_compression: int
    """Frames per latent frame after the first (4 for the Wan VAEs)."""
    patch_height: int
    patch_width: int
    len_t: int
    """Latent frames per chunk."""
    cache_frames: int
    """Latent frames the KV cache holds besides the current chunk (sink + window)."""
    num_layers: int
    dim: int
    dtype_bytes: int
    num_parameters: int
    """Transformer parameters (both experts for Wan 2.2 A14B)."""


def validate_before_work(
    run_config: Any,
    *,
    checkpoints: bool = True,
    memory: bool = True,
    world_size: int | None = None,
    first_frame: bool = True,
) -> None:
    """Every check that needs no weights: runner values, sizes, inputs, checkpoints, memory.

    ``world_size``: the job's number of ranks, ``None`` when not known here (a config
    printed or a sweep checked before launch): the checks that need it are skipped.
    ``first_frame=False`` skips the ``runner.image`` check (flashdreams-serve: each session
    brings its own first frame)."""
    from flashdreams.runner.runner import validate_runner_config

    runner, pipeline = run_config.runner, run_config.pipeline
    validate_runner_config(runner)
    check_decode_plan(run_config.parallel, runner, world_size)
    if first_frame:
        check_first_frame(pipeline, runner)
    geometry = pipeline_geometry(pipeline)
    if geometry is not None:
        check_pixel_size(runner, geometry)
    if checkpoints:
        check_checkpoints(pipeline, allow_random_weights=runner.allow_random_weights)
    if memory and geometry is not None:
        check_memory(runner, geometry, world_size or 1)


def check_decode_plan(parallel: Any, runner: Any, world_size: int | None) -> None:
    """``parallel.decode`` against the runner's settings and the number of ranks (when
    known)."""
    from flashdreams.core.distributed.plan import (
        DEDICATED_DECODE_CFG_PARALLEL,
        DEDICATED_DECODE_NEEDS_TWO_RANKS,
    )
    from flashdreams.runner.decode_plans import decode_plan_conflict

    conflict = decode_plan_conflict(parallel.decode, runner)
    if conflict is not None:
        raise ValueError(conflict)
    if parallel.decode != "dedicated" or world_size is None:
        return
    if world_size < 2:
        raise ValueError(DEDICATED_DECODE_NEEDS_TWO_RANKS.format(world_size=world_size))
    if parallel.cfg_parallel and world_size % 2 == 0:
        raise ValueError(DEDICATED_DECODE_CFG_PARALLEL.format(world_size=world_size))


# ---- inputs ---------------------------------------------------------------------------------


def check_first_frame(pipeline: Any, runner: Any) -> None:
    """I2V pipelines need ``runner.image``; T2V pipelines take none."""
    takes_image = getattr(pipeline, "encoder", None) is not None
    name = getattr(pipeline, "name", "this pipeline")
    if takes_image and runner.image is None:
        raise ValueError(
            f"'{name}' makes a video from a first frame: give one with "
            "runner.image=path/to/frame.png (PNG or JPEG; it is resized to "
            "runner.height x runner.width)"
        )
    if not takes_image and runner.image is not None:
        raise ValueError(
            f"'{name}' makes a video from text only and takes no first frame: drop "
            f"runner.image, or pick an image-to-video slug (flashdreams-run --list)"
        )


# ---- sizes --------------------------------------------------------------------------------------


def _network_configs(transformer: Any) -> list[Any]:
    """The DiT network config(s) of a transformer config (two experts for Wan 2.2 A14B)."""
    networks = []
    for holder in (transformer, getattr(transformer, "transformer_high_noise", None),
                   getattr(transformer, "transformer_low_noise", None)):  # fmt: skip
        network = getattr(holder, "network", None)
        if network is not None and dataclasses.is_dataclass(network):
            networks.append((holder, network))
    return networks


def pipeline_geometry(pipeline: Any) -> PipelineGeometry | None:
    """Read the size rules off the config; ``None`` for pipelines that do not say."""
    import torch

    from flashdreams.infra.config import derive_config

    codec = getattr(pipeline, "decoder", None) or getattr(pipeline, "encoder", None)
    transformer = getattr(getattr(pipeline, "diffusion_model", None), "transformer", None)
    networks = _network_configs(transformer)
    if codec is None or not networks:
        return None
    if any(f.name == "checkpoint_path" for f in dataclasses.fields(codec)):
        codec = derive_config(codec, checkpoint_path=None)
    with torch.device("meta"):
        built_codec = codec.setup()
        num_parameters = sum(
            sum(p.numel() for p in network.setup().parameters()) for _, network in networks
        )
    holder, network = networks[0]
    patch = tuple(getattr(network, "patch_size", (1, 1, 1)))
    dtype = getattr(holder, "dtype", torch.float32)
    return PipelineGeometry(
        spatial_compression=int(getattr(built_codec, "spatial_compression_ratio", 1)),
        temporal_compression=int(getattr(built_codec, "temporal_compression_ratio", 1)),
        patch_height=int(patch[-2]),
        patch_width=int(patch[-1]),
        len_t=int(getattr(holder, "len_t", 1)),
        cache_frames=int(getattr(holder, "sink_size_t", 0))
        + int(getattr(holder, "window_size_t", 0)),
        num_layers=int(getattr(network, "num_layers", 0)),
        dim=int(getattr(network, "dim", 0)),
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        num_parameters=num_parameters,
    )


def _nearby_multiples(value: int, multiple: int) -> str:
    lower = (value // multiple) * multiple
    return " or ".join(str(c) for c in (lower, lower + multiple) if c > 0)


def check_pixel_size(runner: Any, geometry: PipelineGeometry) -> None:
    """Height and width must be multiples of VAE compression x patch size."""
    ratio = geometry.spatial_compression
    multiples = {"height": ratio * geometry.patch_height, "width": ratio * geometry.patch_width}
    problems = [
        f"runner.{name}={getattr(runner, name)} is not a multiple of {multiple} "
        f"(try {_nearby_multiples(getattr(runner, name), multiple)})"
        for name, multiple in multiples.items()
        if getattr(runner, name) % multiple
    ]
    if problems:
        raise ValueError(
            "; ".join(problems) + f". Pixel sizes must be multiples of the VAE's spatial "
            f"compression {ratio} x the transformer's patch size "
            f"{geometry.patch_height}x{geometry.patch_width}"
        )


# ---- memory ---------------------------------------------------------------------------------------


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1024**3:.1f} GiB"


def available_memory_bytes(device: str) -> tuple[int, str] | None:
    """Free memory of the device this rank will use, and what it is; ``None`` if unknown."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), f"free memory of {device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available host memory"
    except OSError:
        pass
    return None


def minimum_memory_bytes(
    runner: Any, geometry: PipelineGeometry, world_size: int
) -> dict[str, int]:
    """A lower bound of what one rank allocates for this size, by part."""
    latent_height = runner.height // geometry.spatial_compression
    latent_width = runner.width // geometry.spatial_compression
    tokens_per_frame = (latent_height // geometry.patch_height) * (
        latent_width // geometry.patch_width
    )
    frames_per_chunk = geometry.len_t * geometry.temporal_compression
    return {
        "transformer weights": geometry.num_parameters * geometry.dtype_bytes,
        "KV cache": 2 * geometry.num_layers * geometry.cache_frames * tokens_per_frame
        * geometry.dim * geometry.dtype_bytes // max(world_size, 1),
        "one decoded chunk": frames_per_chunk * 3 * runner.height * runner.width * 4,
    }  # fmt: skip


def check_memory(runner: Any, geometry: PipelineGeometry, world_size: int) -> None:
    """Refuse a size whose memory lower bound exceeds what the machine has free."""
    device = _planned_device(world_size)
    available = available_memory_bytes(device)
    if available is None:
        return
    free, what = available
    parts = minimum_memory_bytes(runner, geometry, world_size)
    needed = sum(parts.values())
    if needed <= free:
        return
    detail = ", ".join(f"{name} {_size(value)}" for name, value in parts.items())
    scale = math.sqrt(max(free - parts["transformer weights"], 0) / max(needed, 1) / 2)
    hint = ""
    if 0 < scale < 1:
        multiple = geometry.spatial_compression * geometry.patch_height
        height = max(multiple, int(runner.height * scale) // multiple * multiple)
        width = max(multiple, int(runner.width * scale) // multiple * multiple)
        hint = f"; try runner.height={height} runner.width={width} or more ranks"
    raise ValueError(
        f"runner.height x runner.width = {runner.height}x{runner.width} needs at least "
        f"{_size(needed)} per rank ({detail}) but the {what} is {_size(free)}{hint}"
    )


def _planned_device(world_size: int) -> str:
    """The device ``init_distributed`` will pick for this rank (without starting anything)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"


# ---- checkpoints --------------------------------------------------------------------------------------


def checkpoint_fields(config: Any, path: str = "pipeline") -> list[tuple[str, Any, Any]]:
    """``(dotted key, value, class default)`` of every ``checkpoint_path`` / ``tokenizer_path``
    in a config tree."""
    found = []
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return found
    for field in dataclasses.fields(config):
        if field.name.startswith("_"):
            continue
        value = getattr(config, field.name)
        key = f"{path}.{field.name}"
        if field.name in ("checkpoint_path", "tokenizer_path"):
            default = field.default if field.default is not dataclasses.MISSING else None
            found.append((key, value, default))
        elif dataclasses.is_dataclass(value):
            found.extend(checkpoint_fields(value, key))
    return found


def _file_name(address: str) -> str:
    return address.rstrip("/").rsplit("/", 1)[-1]


def check_checkpoints(pipeline: Any, *, allow_random_weights: bool) -> list[str]:
    """Every checkpoint a slug needs must be a local file before anything is built.

    Returns the keys left to random initialisation (only with ``allow_random_weights``).
    """
    problems, random_keys = [], []
    for key, value, default in checkpoint_fields(pipeline):
        is_tokenizer = key.endswith("tokenizer_path")
        if is_tokenizer and str(value).startswith(BUILTIN_TOKENIZER_PREFIX):
            continue
        if value is None or value == "":
            if allow_random_weights:
                random_keys.append(key)
                continue
            source = default if isinstance(default, str) and default else None
            expected = f"e.g. {_file_name(source)} from {source}" if source else "a local file"
            problems.append(f"{key} is not set (expects {expected})")
        elif str(value).startswith(REMOTE_PREFIXES):
            problems.append(
                f"{key}: download {_file_name(str(value))} from {value} and set the key to its "
                "local path"
            )
        elif is_tokenizer and not Path(str(value)).expanduser().is_dir():
            problems.append(
                f"{key}: '{value}' is not a local folder (expects the tokenizer folder, e.g. "
                "google/umt5-xxl/ from the Wan 2.1 release)"
            )
        elif not Path(str(value)).expanduser().exists():
            problems.append(f"{key}: '{value}' does not exist")
    if problems:
        name = getattr(pipeline, "name", "this pipeline")
        hint = (
            " (runner.allow_random_weights=true builds unset components with random weights, "
            "for tests.)"
            if any(" is not set " in problem for problem in problems)
            else ""
        )
        raise FileNotFoundError(
            f"'{name}' needs local checkpoint files, and {len(problems)} key(s) do not point at "
            f"one: {'; '.join(problems)}. Nothing is downloaded for you.{hint}"
        )
    return random_keys
