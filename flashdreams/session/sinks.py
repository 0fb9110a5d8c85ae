"""Where a generated chunk goes: the sinks of a streaming session.

A sink decides how a chunk is produced and consumed around the session's
``generate -> sink -> finalize`` step:

* :class:`InlineDecodeSink`: the pipeline decodes the chunk as part of
  ``generate`` and the frames are written on this thread, before ``finalize``.
* :class:`BackgroundDecodeSink`: the pipeline returns the clean latent
  (``generate_latent``); a :class:`~flashdreams.session.worker.BackgroundChunkWorker`
  decodes and writes it on a background thread (its own CUDA stream) while this
  thread finalizes the chunk and denoises the next one.

Both write decoded frames to a :class:`FrameWriter` (an mp4 file, a client's
frame queue, ...), or to nothing on ranks that do not write. New sinks (per-client
JPEG streams, latents only, a decode plan spread over ranks) subclass
:class:`ChunkSink`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from flashdreams.session.checks import check_finite
from flashdreams.session.frames import video_to_uint8_frames
from flashdreams.session.stats import ChunkStats

Critical = Callable[[], AbstractContextManager[Any]]
"""A section that a stop request (SIGTERM) must not cut in half, e.g. appending a chunk."""


class FrameWriter(Protocol):
    """Consumer of decoded frames ``[T, H, W, 3]`` uint8, chunk after chunk."""

    def append(self, frames: Any) -> None:
        """Write the frames of one chunk."""

    def close(self) -> None:
        """Finish the output (the file plays afterwards)."""


@dataclass
class ProducedChunk:
    """What the generation of one AR step gave this rank."""

    index: int
    """AR step."""
    local_latent: torch.Tensor | None
    """This rank's (patchified, possibly sharded) clean latent, for checks."""
    latent: torch.Tensor | None = None
    """Gathered clean latent ``[*batch, T, C, H, W]`` when the sink produced it (on the
    output rank; ``None`` elsewhere)."""
    latent_gathered: bool = False
    """Whether ``latent`` is the gathered latent (no second gather may be issued)."""
    video: torch.Tensor | None = None
    """Decoded chunk ``[*batch, T, 3, H, W]`` in [-1, 1] (inline sink, output rank)."""


FrameCheck = Callable[[torch.Tensor, int], None]
"""``check(video, index)``: inspects a decoded chunk ``[*batch, T, 3, H, W]`` before it is
written (warns, or raises to stop the session)."""

WrittenCallback = Callable[[int, int], None]
"""``on_written(index, num_frames)``: the chunk's frames are written (0 frames off the
writing rank). May be called from a background thread."""


class ChunkSink(ABC):
    """Produces each chunk from the pipeline and delivers it somewhere.

    The session calls, per AR step: :meth:`check` -> :meth:`produce` ->
    :meth:`deliver` -> (``finalize``); at the end :meth:`drain` and :meth:`close`.
    """

    def __init__(
        self,
        writer: FrameWriter | None,
        *,
        check_finite: bool = True,
        frame_check: FrameCheck | None = None,
    ) -> None:
        self.writer = writer
        self.check_finite = check_finite
        self.frame_check = frame_check
        self.critical: Critical = nullcontext
        self.on_written: WrittenCallback = lambda index, num_frames: None

    def attach(self, *, critical: Critical, on_written: WrittenCallback) -> None:
        """Called by the session that owns this sink."""
        self.critical = critical
        self.on_written = on_written

    @abstractmethod
    def produce(self, pipeline: Any, index: int, cache: Any, control: Any = None) -> ProducedChunk:
        """Run the pipeline's generation of AR step ``index`` (collective under CP);
        ``control`` is the step's input for the pipeline's encoder (``None``: none)."""

    @abstractmethod
    def deliver(self, chunk: ProducedChunk, stats: ChunkStats) -> None:
        """Write the chunk, or hand it over for writing; fills its part of ``stats``."""

    def check(self) -> None:  # noqa: B027 - a no-op unless the sink works in the background
        """Raise a failure of earlier background work (nothing to do for inline sinks)."""

    @property
    def failed_index(self) -> int | None:
        """AR step whose background work failed, ``None`` while none did."""
        return None

    def drain(self) -> float:
        """Wait for background work; returns the seconds waited."""
        return 0.0

    def abandon(self) -> None:  # noqa: B027 - a no-op unless the sink waits on other ranks
        """The rollout failed because another rank did: :meth:`close` must not wait on
        other ranks."""

    def close(self) -> None:
        """Drain and close the writer. Idempotent."""
        if self.writer is not None:
            with self.critical():
                self.writer.close()
            self.writer = None

    def _check_frames(self, video: torch.Tensor, index: int) -> None:
        if self.frame_check is not None:
            self.frame_check(video, index)

    def _write(self, video: torch.Tensor) -> int:
        """Append the first batch element's frames; returns their count."""
        assert self.writer is not None
        # [*batch, T, 3, H, W] -> first element [T, 3, H, W] -> [T, H, W, 3] uint8
        frames = video_to_uint8_frames(video.reshape(-1, *video.shape[-4:])[0])
        self.writer.append(frames)
        return int(frames.shape[0])


class InlineDecodeSink(ChunkSink):
    """Decode as part of ``generate`` and write on this thread before ``finalize``."""

    def produce(self, pipeline: Any, index: int, cache: Any, control: Any = None) -> ProducedChunk:
        video = pipeline.generate(index, cache, *_control_argument(control))
        return ProducedChunk(index=index, local_latent=pipeline.clean_latent(cache), video=video)

    def deliver(self, chunk: ProducedChunk, stats: ChunkStats) -> None:
        started = time.perf_counter()
        num_frames = 0
        if chunk.video is not None:
            self._check_frames(chunk.video, chunk.index)
        if self.writer is not None and chunk.video is not None:
            with self.critical():
                num_frames = self._write(chunk.video)
                stats.num_frames = num_frames
                stats.write_s = time.perf_counter() - started
                self.on_written(chunk.index, num_frames)
        else:
            stats.num_frames = 0
            stats.write_s = time.perf_counter() - started
            self.on_written(chunk.index, 0)


class ReturningSink(ChunkSink):
    """Hands every chunk back to the caller (its gathered latent and, with ``decode``, its
    video), and writes the frames too when given a writer.

    Interactive sessions step on this sink: :attr:`last` is the chunk the latest step
    produced. Decoding runs on this thread after generation, as with the inline sink.
    """

    def __init__(
        self, writer: FrameWriter | None = None, *, decode: bool = True, check_finite: bool = True
    ) -> None:
        super().__init__(writer, check_finite=check_finite)
        self.decode = decode
        self.last: ProducedChunk | None = None
        """The latest chunk (gathered latent; video when decoded), on the output rank."""
        self.delivered_at: float | None = None
        """``time.perf_counter()`` when the latest chunk was decoded and written."""
        self._pipeline: Any = None
        self._cache: Any = None

    def produce(self, pipeline: Any, index: int, cache: Any, control: Any = None) -> ProducedChunk:
        self._pipeline, self._cache = pipeline, cache
        latent = pipeline.generate_latent(index, cache, *_control_argument(control))
        return ProducedChunk(
            index=index,
            local_latent=pipeline.clean_latent(cache),
            latent=latent,
            latent_gathered=True,
        )

    def deliver(self, chunk: ProducedChunk, stats: ChunkStats) -> None:
        started = time.perf_counter()
        if self.decode and chunk.latent is not None:
            chunk.video = self._pipeline.decode_latent(chunk.latent, chunk.index, self._cache)
            if self.check_finite:
                check_finite(chunk.video, chunk.index)
        decoded = time.perf_counter()
        stats.decode_s = decoded - started
        num_frames = 0
        if self.writer is not None and chunk.video is not None:
            with self.critical():
                num_frames = self._write(chunk.video)
        stats.num_frames = num_frames
        stats.write_s = time.perf_counter() - decoded
        self.last = chunk
        self.delivered_at = time.perf_counter()
        self.on_written(chunk.index, num_frames)


def _control_argument(control: Any) -> tuple[Any, ...]:
    """The optional ``input`` argument of ``generate`` / ``generate_latent``: given only when
    there is a control, so pipelines without per-chunk inputs keep their two-argument form."""
    return () if control is None else (control,)


class BackgroundDecodeSink(ChunkSink):
    """Decode and write on a background worker while this thread goes on.

    Only the writing rank runs a worker (``writer`` given); the others only
    generate. The video and latents equal the inline sink's.
    """

    def __init__(
        self,
        writer: FrameWriter | None,
        *,
        device: Any,
        check_finite: bool = True,
        frame_check: FrameCheck | None = None,
    ) -> None:
        super().__init__(writer, check_finite=check_finite, frame_check=frame_check)
        self.worker = None
        if writer is not None:
            from flashdreams.session.worker import BackgroundChunkWorker

            self.worker = BackgroundChunkWorker(device)
        self._pipeline: Any = None
        self._cache: Any = None

    def produce(self, pipeline: Any, index: int, cache: Any, control: Any = None) -> ProducedChunk:
        self._pipeline, self._cache = pipeline, cache
        latent = pipeline.generate_latent(index, cache, *_control_argument(control))
        return ProducedChunk(
            index=index,
            local_latent=pipeline.clean_latent(cache),
            latent=latent,
            latent_gathered=True,
        )

    def deliver(self, chunk: ProducedChunk, stats: ChunkStats) -> None:
        latent = chunk.latent
        stats.wait_s = 0.0
        if self.worker is None or latent is None:
            self.on_written(chunk.index, 0)
            return
        # ``latent`` is freshly allocated by generate_latent and nothing on this thread
        # writes into it afterwards (finalize only reads the clean latent).
        job = self._job(latent, chunk.index, stats)
        # Blocks while two chunks are pending; a stop request waits for the hand-over,
        # so the worker's bookkeeping is never cut in half.
        with self.critical():
            stats.wait_s = self.worker.submit(chunk.index, job, tensors=[latent])

    def _job(self, latent: torch.Tensor, index: int, stats: ChunkStats) -> Callable[[], None]:
        pipeline, cache = self._pipeline, self._cache

        def decode_and_write() -> None:
            """On the worker thread: decode one chunk, check it, append it."""
            from flashdreams.infra.profiler import EventProfiler

            timer = EventProfiler(use_cuda=latent.device.type == "cuda")
            video = pipeline.decode_latent(latent, index, cache)
            timer.record("decode")
            if self.check_finite:
                check_finite(video, index)
            self._check_frames(video, index)
            decode_s = timer.sync_and_summarize()["decode"] / 1000.0
            started = time.perf_counter()
            # no stop guard here: signals reach the main thread only
            stats.num_frames = self._write(video)
            stats.decode_s = decode_s
            stats.write_s = time.perf_counter() - started
            self.on_written(index, stats.num_frames)

        return decode_and_write

    def check(self) -> None:
        if self.worker is not None:
            self.worker.raise_if_failed()

    @property
    def failed_index(self) -> int | None:
        return None if self.worker is None else self.worker.failed_autoregressive_index

    def drain(self) -> float:
        return 0.0 if self.worker is None else self.worker.drain()

    def close(self) -> None:
        if self.worker is not None:
            with self.critical():
                # The worker must be idle before the video is closed; the chunks it was
                # handed are finished (or skipped after a failed one) first.
                self.worker.drain()
            self.worker.close()
            self.worker = None
        super().close()
