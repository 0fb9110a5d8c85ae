"""The streaming session loop driven from plain Python, chunk by chunk (no CLI, no runner).

A tiny random-weight Wan T2V pipeline on CPU is stepped through
:class:`StreamingSession` once with the inline sink and once with the
background (overlap) sink: the frames written and the kept latents must be
bit-identical, every chunk must be reported once, in order, when it is both
written and finalized, and the session must be inspectable between steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_overlap_decode import LEN_T, NUM_CHUNKS, frames_of, tiny_t2v_config

from flashdreams.session import (
    BackgroundDecodeSink,
    ChunkStats,
    InlineDecodeSink,
    StreamingSession,
)

LATENT_HEIGHT, LATENT_WIDTH = 4, 6


class ListWriter:
    """A frame writer that keeps every chunk's frames in memory."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.closed = False

    def append(self, frames: np.ndarray) -> None:
        assert not self.closed, "append after close"
        self.chunks.append(frames.copy())

    def close(self) -> None:
        self.closed = True


def run_session(background: bool):
    torch.manual_seed(0)
    pipeline = tiny_t2v_config().setup().eval()
    writer = ListWriter()
    sink = BackgroundDecodeSink(writer, device="cpu") if background else InlineDecodeSink(writer)
    reported: list[int] = []
    session = StreamingSession.open(
        pipeline,
        sink,
        text=["a red ball"],
        height=LATENT_HEIGHT,
        width=LATENT_WIDTH,
        keep_latents=True,
        on_chunk=lambda stats: reported.append(stats.index),
    )
    for index in range(NUM_CHUNKS):
        assert session.next_index == index
        stats = session.step()
        assert isinstance(stats, ChunkStats) and stats.index == index
        assert session.progress.autoregressive_index == index
        if not background:  # written before finalize, on this thread
            assert len(writer.chunks) == index + 1
            assert session.progress.last_completed_chunk == index
    session.finish()
    latents = session.close()
    assert writer.closed
    assert reported == list(range(NUM_CHUNKS))
    assert session.progress.last_completed_chunk == NUM_CHUNKS - 1
    assert session.progress.num_chunks_written == NUM_CHUNKS
    return writer, latents, session.stats


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_session_steps_chunk_by_chunk(background):
    writer, latents, rollout = run_session(background)
    frames = np.concatenate(writer.chunks)
    assert frames.shape == (frames_of(NUM_CHUNKS), 32, 48, 3)
    assert latents.shape == (1, NUM_CHUNKS * LEN_T, 16, LATENT_HEIGHT, LATENT_WIDTH)
    assert rollout.num_frames == frames.shape[0]
    assert rollout.first_chunk_latency_s > 0 and rollout.steady_fps > 0
    for chunk in rollout.chunks:
        assert (chunk.decode_s is not None) == background
        assert (chunk.wait_s is not None) == background


def test_inline_and_background_sinks_give_the_same_video():
    inline_writer, inline_latents, _ = run_session(background=False)
    background_writer, background_latents, _ = run_session(background=True)
    assert len(inline_writer.chunks) == len(background_writer.chunks) == NUM_CHUNKS
    for inline, background in zip(inline_writer.chunks, background_writer.chunks, strict=True):
        assert np.array_equal(inline, background)
    assert torch.equal(inline_latents, background_latents)
