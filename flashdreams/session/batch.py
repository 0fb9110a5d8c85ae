"""The next chunk of several sessions generated as one batch: one forward for all.

Sessions over one pipeline that are at the same chunk of same-sized rollouts
(the transformer's ``can_batch_caches``) have their transformer caches
concatenated along the batch (``concat_caches``); the chunk is denoised for
all of them at once, each drawing its noise from its own generator; every
session then decodes and delivers its own rows through its own sink and
decoder cache; the chunk is committed to the batched KV cache; and the caches
are split back (``split_cache``), so each session goes on alone or batched
with any others later. Each session's chunk equals the one it would get alone
(up to the batched kernels' rounding).

Batched: T2V pipelines (no per-chunk streaming encoder) whose transformer
supports it (Wan 2.1 architecture) and chunks without a control.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from flashdreams.session.loop import StreamingSession
from flashdreams.session.stats import ChunkStats


def can_batch(streams: list[StreamingSession]) -> bool:
    """Whether the next chunks of ``streams`` (one pipeline) can run as one batch."""
    pipeline = streams[0].pipeline
    if getattr(pipeline, "encoder", None) is not None:
        return False
    if any(stream.pipeline is not pipeline for stream in streams):
        return False
    if len({stream.next_index for stream in streams}) != 1:
        return False
    transformer = pipeline.diffusion_model.transformer
    return transformer.can_batch_caches([stream.cache.transformer_cache for stream in streams])


class _BatchEntry:
    """The pipeline as one session of a batched step sees it: its chunk was generated with
    the others', it decodes its own rows, and the commit is done for the whole batch after."""

    def __init__(
        self, pipeline: Any, latent: torch.Tensor | None, local_latent: torch.Tensor
    ) -> None:
        self.pipeline = pipeline
        self.latent = latent
        self.local_latent = local_latent

    def generate_latent(self, index: int, cache: Any, *_: Any) -> torch.Tensor | None:
        cache.autoregressive_index = index
        return self.latent

    def clean_latent(self, cache: Any) -> torch.Tensor:
        return self.local_latent

    def gather_clean_latent(self, cache: Any) -> torch.Tensor | None:
        return self.latent

    def decode_latent(self, latent: torch.Tensor, index: int, cache: Any) -> torch.Tensor:
        return self.pipeline.decode_latent(latent, index, cache)

    def finalize(self, index: int, cache: Any) -> None:
        return None


def step_batched(streams: list[StreamingSession]) -> list[ChunkStats]:
    """Generate the next chunk of every stream as one batch; deliver each through its own
    sink; commit them together. Returns each stream's chunk stats (the batched denoise and
    commit times are every stream's).

    The streams must pass :func:`can_batch`. Under context parallelism every rank calls
    this with the same sessions in the same order. If a session's delivery fails, the
    chunk is still committed and the caches split back before the error is raised.
    """
    pipeline = streams[0].pipeline
    transformer = pipeline.diffusion_model.transformer
    index = streams[0].next_index
    caches = [stream.cache for stream in streams]
    batched_transformer_cache = transformer.concat_caches(
        [cache.transformer_cache for cache in caches]
    )
    batched = dataclasses.replace(
        caches[0],
        transformer_cache=batched_transformer_cache,
        encoder_cache=None,
        decoder_cache=None,
        final_state=None,
        event_profiler=None,
    )
    started = time.perf_counter()
    # [N * B, T, C, H, W] on the output rank (None elsewhere); this rank's [N * B, L, D]
    latent = pipeline.generate_latent(index, batched)
    local_latent = pipeline.clean_latent(batched)
    generate_s = time.perf_counter() - started
    rows = local_latent.shape[0] // len(streams)
    stats: list[ChunkStats] = []
    try:
        for entry, stream in enumerate(streams):
            part = slice(entry * rows, (entry + 1) * rows)
            view = _BatchEntry(
                pipeline, None if latent is None else latent[part], local_latent[part]
            )
            stats.append(stream.step(pipeline=view))
    finally:
        started = time.perf_counter()
        pipeline.finalize(index, batched)
        finalize_s = time.perf_counter() - started
        for stream, own in zip(
            streams, transformer.split_cache(batched_transformer_cache), strict=True
        ):
            stream.cache.transformer_cache = own
            stream.cache.autoregressive_index = index
    for chunk in stats:
        chunk.generate_s += generate_s
        chunk.finalize_s += finalize_s
        chunk.total_s += generate_s + finalize_s
    return stats
