"""The committed chunks a Wan rollout's KV cache still depends on, kept for a re-cache.

A prompt switch in ``recache`` mode rebuilds the self-attention KV cache under
the new text conditioning by replaying, through the commit pass, the chunks
whose tokens the cache holds: the sink chunks and the chunks of the rolling
window. :class:`CommitHistory` keeps exactly those (what each commit pass
consumed), so its memory is bounded by ``sink + window`` like the KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CommittedChunk:
    """What the commit pass of one chunk consumed."""

    chunk_index: int
    """AR index of the chunk (its RoPE position)."""
    latent: torch.Tensor
    """This rank's patchified latent ``[*batch, L_rank, D]`` as the commit pass saw it:
    the clean latent, re-noised to ``context_noise`` when that is > 0 (no new draws on replay)."""
    timestep: torch.Tensor
    """Timestep of the commit pass (``context_noise``)."""
    input: Any = None
    """Patchified encoder output of the chunk (e.g. an I2V control), or ``None``."""


class CommitHistory:
    """The committed chunks whose tokens a sink + rolling-window KV cache holds.

    With chunks of ``len_t`` latent frames, a sink of ``sink_size_t`` and a
    window of ``window_size_t`` frames, the cache holds tokens of the first
    ``ceil(sink / len_t)`` chunks (the sink) and of the last
    ``ceil(window / len_t)`` committed chunks; every other chunk is dropped
    when it leaves the window.
    """

    def __init__(self, *, len_t: int, window_size_t: int, sink_size_t: int) -> None:
        self.num_sink_chunks = -(-sink_size_t // len_t)
        """Chunks with tokens in the sink."""
        self.num_window_chunks = -(-window_size_t // len_t)
        """Most recent chunks with tokens in the window."""
        self.chunks: list[CommittedChunk] = []
        """Kept chunks in AR order."""

    def append(self, chunk: CommittedChunk) -> None:
        """Remember a chunk being committed; forget the ones no longer in the cache."""
        assert not self.chunks or chunk.chunk_index > self.chunks[-1].chunk_index
        self.chunks.append(chunk)
        first_in_window = chunk.chunk_index + 1 - self.num_window_chunks
        self.chunks = [
            kept
            for kept in self.chunks
            if kept.chunk_index < self.num_sink_chunks or kept.chunk_index >= first_in_window
        ]

    def can_batch_with(self, other: CommitHistory) -> bool:
        """Same chunks kept, committed at the same timesteps, without encoder inputs."""
        return len(self.chunks) == len(other.chunks) and all(
            a.chunk_index == b.chunk_index
            and a.input is None
            and b.input is None
            and a.latent.shape[1:] == b.latent.shape[1:]
            and torch.equal(a.timestep, b.timestep)
            for a, b in zip(self.chunks, other.chunks, strict=True)
        )

    @classmethod
    def concat(cls, histories: Sequence[CommitHistory]) -> CommitHistory:
        """The histories of rollouts batched together: each kept chunk's latents stacked."""
        first = histories[0]
        merged = cls.__new__(cls)
        merged.num_sink_chunks = first.num_sink_chunks
        merged.num_window_chunks = first.num_window_chunks
        merged.chunks = [
            CommittedChunk(
                chunk_index=chunks[0].chunk_index,
                latent=torch.cat([chunk.latent for chunk in chunks], dim=0),
                timestep=chunks[0].timestep,
            )
            for chunks in zip(*(history.chunks for history in histories), strict=True)
        ]
        return merged

    def split_rows(self, ranges: Sequence[tuple[int, int]]) -> list[CommitHistory]:
        """The history of each batch-row range (latents are views)."""
        parts = []
        for start, stop in ranges:
            part = CommitHistory.__new__(CommitHistory)
            part.num_sink_chunks = self.num_sink_chunks
            part.num_window_chunks = self.num_window_chunks
            part.chunks = [
                CommittedChunk(
                    chunk_index=chunk.chunk_index,
                    latent=chunk.latent[start:stop],
                    timestep=chunk.timestep,
                    input=chunk.input,
                )
                for chunk in self.chunks
            ]
            parts.append(part)
        return parts

    def storage_bytes(self) -> int:
        """Bytes held by the kept latents."""
        return sum(chunk.latent.numel() * chunk.latent.element_size() for chunk in self.chunks)
