"""The streaming session loop: generate -> hand the chunk to a sink -> finalize.

A :class:`StreamingSession` holds one rollout of a loaded pipeline (its caches,
its sink, its stats) and is stepped chunk by chunk from outside::

    session = StreamingSession.open(pipeline, sink, text=["a cat"], height=60, width=104)
    for _ in range(num_chunks):
        session.step()
    latents = session.close()

The offline runner drives it to the end of a rollout; an interactive caller
can step it, change what it conditions on between steps, and close it when it
likes. Every rank steps its session in lockstep (context parallelism runs
inside ``generate`` and ``finalize``); only the writing rank's sink writes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from flashdreams.session.checks import check_finite
from flashdreams.session.sinks import ChunkSink, Critical, ProducedChunk
from flashdreams.session.stats import ChunkStats, RolloutStats


class SessionPipeline(Protocol):
    """What a session needs from a pipeline (every ``StreamInferencePipeline`` has it).

    The background sink also needs ``generate_latent(index, cache)`` and
    ``decode_latent(latent, index, cache)``.
    """

    def initialize_cache(
        self, text: list[str], image: Any = None, *, height: int, width: int
    ) -> Any:
        """Per-rollout caches for the prompt(s), optional first frame, latent size."""

    def generate(self, autoregressive_index: int, cache: Any) -> torch.Tensor | None:
        """Denoise and decode one chunk (decoded video on the output rank)."""

    def finalize(self, autoregressive_index: int, cache: Any) -> dict[str, Any] | None:
        """Commit the chunk to the KV cache; returns profile stats when profiling."""

    def clean_latent(self, cache: Any) -> torch.Tensor | None:
        """This rank's clean latent of the latest ``generate`` (no communication)."""

    def gather_clean_latent(self, cache: Any) -> torch.Tensor | None:
        """The latest clean latent gathered on the output rank (collective)."""


FaultHook = Callable[[int, str, "torch.Tensor | None"], None]
"""``hook(index, stage, latent)``: test-only fault injection at a stage of a step."""

StopHook = Callable[[str], None]
"""``hook(where)``: called at the safe points of a step (before it, and after its chunk
was handed to the sink); raises to stop the session there (every rank must agree)."""


@dataclass
class RolloutProgress:
    """Where the rollout is; read to report failures and written to ``stats.json``."""

    prompt_index: int = 0
    """Prompt being rolled out."""
    autoregressive_index: int | None = None
    """AR step in progress, ``None`` before the first ``generate``."""
    stage: str = "build"
    """``build``, ``initialize``, ``switch`` (a prompt switch between chunks), ``generate``,
    ``write``, ``finalize``, ``decode`` (a failed background decode) or ``done``."""
    last_completed_chunk: int | None = None
    """Last AR step of the current prompt that was written and finalized."""
    num_chunks_written: int = 0
    """Chunks appended to any output by this run (writing rank)."""
    stop_latency_s: float | None = None
    """Seconds from a stop signal to the safe point where the rollout stopped."""


ChunkCallback = Callable[[ChunkStats], None]
"""Called once per chunk when it is both written and finalized (possibly on the worker)."""


class StreamingSession:
    """One rollout: a pipeline's caches, a sink and the stats, stepped chunk by chunk.

    Args:
        pipeline: the loaded pipeline.
        cache: its caches for this rollout (see :meth:`open`).
        sink: where each chunk goes.
        stats: the rollout's stats (filled as it goes).
        progress: shared progress record (a new one by default).
        keep_latents: keep every chunk's gathered clean latent (``close`` returns them).
        check_finite: fail at the first chunk whose latent or video holds NaN/Inf.
        critical: guard for sections a stop request must not cut (appending a chunk).
        on_chunk: called once per chunk when it is written and finalized.
        fault_hook: test-only fault injection.
        stop_hook: asked at the safe points of every step whether to stop.
    """

    def __init__(
        self,
        pipeline: SessionPipeline,
        cache: Any,
        sink: ChunkSink,
        *,
        stats: RolloutStats,
        progress: RolloutProgress | None = None,
        keep_latents: bool = False,
        check_finite: bool = True,
        critical: Critical = nullcontext,
        on_chunk: ChunkCallback | None = None,
        fault_hook: FaultHook | None = None,
        stop_hook: StopHook | None = None,
        started: float | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.cache = cache
        self.sink = sink
        self.stats = stats
        self.progress = progress or RolloutProgress()
        self.keep_latents = keep_latents
        self.check_finite = check_finite
        self.on_chunk = on_chunk
        self.fault_hook = fault_hook
        self.stop_hook = stop_hook
        self.next_index = 0
        """AR step the next :meth:`step` generates."""
        self.latents: list[torch.Tensor] = []
        self._started = time.perf_counter() if started is None else started
        self._lock = threading.Lock()
        self._finalized: int | None = None
        self._written: int | None = None
        self._reported: int | None = None
        sink.attach(critical=critical, on_written=self._on_written)

    @classmethod
    def open(
        cls,
        pipeline: SessionPipeline,
        sink: ChunkSink,
        *,
        text: list[str],
        height: int,
        width: int,
        image: torch.Tensor | None = None,
        keep_encoders: bool = False,
        stats: RolloutStats | None = None,
        progress: RolloutProgress | None = None,
        **kwargs: Any,
    ) -> StreamingSession:
        """Build the rollout's caches (text / image encoders run once) and a session on them.

        ``height`` / ``width`` are latent sizes; ``keep_encoders`` keeps the text encoder
        loaded for :meth:`switch_prompt` (pipelines free one-shot encoders after the first
        encode otherwise); ``stats`` (new by default) is filled as the session goes; other
        keywords are those of the constructor.
        """
        started = time.perf_counter()
        progress = progress or RolloutProgress()
        progress.stage = "initialize"
        options = {"release_oneshot_encoders": False} if keep_encoders else {}
        cache = pipeline.initialize_cache(
            text=text, image=image, height=height, width=width, **options
        )
        stats = stats or RolloutStats(prompt=" | ".join(text))
        return cls(pipeline, cache, sink, stats=stats, progress=progress, started=started, **kwargs)

    # ---- between steps -----------------------------------------------------------------------

    def switch_prompt(
        self,
        text: list[str] | None,
        *,
        negative_prompt: str | None = None,
        recache: bool = True,
    ) -> None:
        """Condition the chunks from the next one on ``text`` (and / or a new CFG negative
        prompt); ``recache`` recomputes the cached chunks' self-attention K/V under it.

        Call between steps, on every rank (a re-cache runs the pipeline's collectives).
        """
        self.progress.stage = "switch"
        self.pipeline.switch_prompt(
            self.cache, text, negative_prompt=negative_prompt, recache=recache
        )
        switch: dict[str, Any] = {"chunk": self.next_index}
        if text is not None:
            switch["prompt"] = " | ".join(text)
        if negative_prompt is not None:
            switch["negative_prompt"] = negative_prompt
        switch["mode"] = "recache" if recache else "none"
        self.stats.prompt_switches.append(switch)

    # ---- one AR step -------------------------------------------------------------------------

    def step(self, control: Any = None, *, pipeline: SessionPipeline | None = None) -> ChunkStats:
        """Generate the next chunk, hand it to the sink, finalize it; returns its stats.

        ``control`` is this chunk's input for the pipeline's encoder (``None``: none).
        ``pipeline`` stands in for the session's pipeline for this step (a batched step
        hands each session a view whose chunk was generated with the others').
        """
        pipeline = self.pipeline if pipeline is None else pipeline
        index = self.next_index
        progress = self.progress
        progress.autoregressive_index = index
        self._stop_point(f"before AR step {index}")
        progress.stage = "generate"
        self._raise_sink_failure()
        started = time.perf_counter()
        chunk = self._generate(pipeline, index, control)
        generated = time.perf_counter()
        progress.stage = "write"
        self._fault(index, "write")
        stats = ChunkStats(index=index)
        self.stats.chunks.append(stats)
        try:
            self.sink.deliver(chunk, stats)
        except BaseException:
            self._raise_sink_failure()
            raise
        del chunk
        delivered = time.perf_counter()
        self._stop_point(f"after AR step {index} was written")
        progress.stage = "finalize"
        self._fault(index, "finalize")
        stats.profile = pipeline.finalize(index, self.cache) or None
        finished = time.perf_counter()
        stats.generate_s = generated - started
        stats.finalize_s = finished - delivered
        stats.total_s = finished - started
        self.next_index = index + 1
        self._mark(finalized=index)
        return stats

    def _generate(self, pipeline: SessionPipeline, index: int, control: Any) -> ProducedChunk:
        self._fault(index, "generate")
        chunk = self.sink.produce(pipeline, index, self.cache, control)
        self._fault(index, "generate", chunk.local_latent)
        if self.check_finite:
            check_finite(chunk.local_latent, index)
            if chunk.video is not None:
                check_finite(chunk.video, index)
        if self.keep_latents:
            # The background sink already holds the gathered latent: no second gather.
            latent = (
                chunk.latent if chunk.latent_gathered else pipeline.gather_clean_latent(self.cache)
            )
            if latent is not None:
                self.latents.append(latent.detach().float().cpu())
        return chunk

    def _stop_point(self, where: str) -> None:
        if self.stop_hook is not None:
            self.stop_hook(where)

    def _fault(self, index: int, stage: str, latent: torch.Tensor | None = None) -> None:
        if self.fault_hook is not None:
            self.fault_hook(index, stage, latent)

    def _raise_sink_failure(self) -> None:
        """Re-raise a failed background decode here, pointing the progress at it."""
        failed_index = self.sink.failed_index
        if failed_index is None:
            return
        self.progress.autoregressive_index = failed_index
        self.progress.stage = "decode"
        self.sink.check()

    # ---- written / finalized bookkeeping (main thread and worker) ----------------------------

    def _on_written(self, index: int, num_frames: int) -> None:
        if index == 0:
            self.stats.first_chunk_latency_s = time.perf_counter() - self._started
        if num_frames:
            self.progress.num_chunks_written += 1
        self._mark(written=index)

    def _mark(self, *, finalized: int | None = None, written: int | None = None) -> None:
        with self._lock:
            if finalized is not None:
                self._finalized = finalized
            if written is not None:
                self._written = written
            completed = self.completed_index
            self.progress.last_completed_chunk = completed
            if completed is None or self.on_chunk is None:
                return
            start = -1 if self._reported is None else self._reported
            self._reported = completed
            done = [self.stats.chunks[i] for i in range(start + 1, completed + 1)]
        for stats in done:
            self.on_chunk(stats)

    @property
    def completed_index(self) -> int | None:
        """Last AR step that is both written and finalized (``None`` before the first)."""
        if self._finalized is None or self._written is None:
            return None
        return min(self._finalized, self._written)

    # ---- end ---------------------------------------------------------------------------------

    def finish(self) -> None:
        """Wait for the sink's background work and raise its failure, if any."""
        self.progress.stage = "write"
        drain_s = self.sink.drain()
        if self.stats.chunks:
            last = self.stats.chunks[-1]
            if last.wait_s is not None:
                last.wait_s += drain_s
            last.total_s += drain_s
        self._raise_sink_failure()

    def close(self) -> torch.Tensor | None:
        """Close the sink (the output is complete); returns the kept latents, stacked in time."""
        self.sink.close()
        self.progress.last_completed_chunk = self.completed_index
        self.stats.finish()
        return torch.cat(self.latents, dim=-4) if self.latents else None
