"""Typed per-chunk and per-rollout statistics of a streaming session.

They become ``stats.json`` (``to_dict``): every time is in seconds, measured on
this rank's main thread unless said otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChunkStats:
    """Timings of one AR step (chunk)."""

    index: int
    """AR step (chunk index within the rollout)."""
    num_frames: int = 0
    """Decoded frames written for this chunk (0 off the writing rank)."""
    generate_s: float = 0.0
    """Denoising (and, with the inline sink, decoding) of the chunk, with the checks."""
    write_s: float | None = None
    """Appending the frames to the output (inline sink: on this thread; background sink:
    on the worker)."""
    decode_s: float | None = None
    """Background sink only: decoding on the worker."""
    wait_s: float | None = None
    """Background sink only: time this thread waited for the worker (a free slot, and
    for the last chunk the drain)."""
    finalize_s: float = 0.0
    """The context-noise forward that writes the chunk's K/V into the cache."""
    total_s: float = 0.0
    """Whole AR step on this thread."""
    profile: dict[str, Any] | None = None
    """Per-stage profile of the pipeline (``runner.profile``)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``stats.json``; fields a sink does not measure are left out."""
        data = {
            "index": self.index,
            "num_frames": self.num_frames,
            "generate_s": self.generate_s,
            "decode_s": self.decode_s,
            "write_s": self.write_s,
            "wait_s": self.wait_s,
            "finalize_s": self.finalize_s,
            "total_s": self.total_s,
            "profile": self.profile,
        }
        return {key: value for key, value in data.items() if value is not None}


@dataclass
class RolloutStats:
    """One prompt's rollout: its chunks and the derived latency / throughput."""

    prompt: str
    """The prompt rolled out."""
    video: str | None = None
    """File name of the video it was written to (``None`` without a file)."""
    chunks: list[ChunkStats] = field(default_factory=list)
    """Per-chunk stats, in AR order."""
    first_chunk_latency_s: float = math.nan
    """From the start of the session to the first chunk's frames being written."""
    num_frames: int = 0
    """Frames written, all chunks."""
    steady_fps: float | None = None
    """Frames per second over every chunk but the first (``None`` with one chunk)."""
    prompt_switches: list[dict[str, Any]] = field(default_factory=list)
    """Prompt switches applied between chunks: ``chunk`` (the first chunk under the switch),
    ``prompt`` and / or ``negative_prompt`` (what changed), ``mode`` (``recache`` or ``none``)."""

    def finish(self) -> None:
        """Derive ``num_frames`` and ``steady_fps`` from the chunks."""
        steady = self.chunks[1:]
        steady_time = sum(chunk.total_s for chunk in steady)
        steady_frames = sum(chunk.num_frames for chunk in steady)
        self.num_frames = sum(chunk.num_frames for chunk in self.chunks)
        self.steady_fps = steady_frames / steady_time if steady and steady_time > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``stats.json``."""
        return {
            "prompt": self.prompt,
            "video": self.video,
            "chunks": [chunk.to_dict() for chunk in self.chunks],
            "first_chunk_latency_s": self.first_chunk_latency_s,
            "num_frames": self.num_frames,
            "steady_fps": self.steady_fps,
            **({"prompt_switches": self.prompt_switches} if self.prompt_switches else {}),
        }
