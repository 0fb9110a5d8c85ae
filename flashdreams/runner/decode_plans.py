"""Decode plans of a run (``parallel.decode``): which ranks turn each chunk's latent into pixels.

- ``rank0`` (default): the rank holding the gathered latent decodes the whole frame
  while the others wait (``runner.overlap_decode`` moves that decode onto a
  background thread of rank 0).
- ``parallel``: every rank decodes one row slab of each frame
  (:class:`~flashdreams.infra.decoder.row_parallel.RowParallelDecoder`, exact);
  rank 0 assembles the pixels and writes them. Each rank's decoder activations
  scale with its slab, so rank 0 no longer needs memory for a whole-frame decode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from flashdreams.session.sinks import (
    FrameCheck,
    FrameWriter,
    InlineDecodeSink,
    ProducedChunk,
    _control_argument,
)

PARALLEL_DECODE_WITH_OVERLAP = (
    "parallel.decode=parallel decodes on every rank in step with the DiT; "
    "runner.overlap_decode=true decodes on a background thread of rank 0. "
    "Choose one: drop runner.overlap_decode or use parallel.decode=rank0"
)


def broadcast_latent(
    latent: torch.Tensor | None, *, src: int, group: dist.ProcessGroup | None, device: Any
) -> torch.Tensor:
    """``latent`` of rank ``src`` on every rank of ``group`` (shape and dtype sent first)."""
    header = [None if latent is None else (tuple(latent.shape), latent.dtype)]
    dist.broadcast_object_list(header, src=src, group=group)
    assert header[0] is not None, f"rank {src} holds no latent to broadcast"
    shape, dtype = header[0]
    if latent is None:
        latent = torch.empty(shape, dtype=dtype, device=device)
    else:
        latent = latent.contiguous()
    dist.broadcast(latent, src=src, group=group)
    return latent


class ParallelChunkDecoder:
    """``parallel.decode=parallel`` for one rollout: every rank decodes a row slab of each chunk.

    Called on every rank with what ``generate_latent`` returned there (the latent on
    the source rank, ``None`` elsewhere); returns the chunk's video on rank ``src``
    and ``None`` on the others.
    """

    def __init__(
        self, decoder: Any, *, group: dist.ProcessGroup | None = None, src: int = 0
    ) -> None:
        from flashdreams.infra.decoder.row_parallel import RowParallelDecoder

        if decoder is None:
            raise ValueError("parallel.decode=parallel needs a pipeline with a decoder")
        self.group = group
        self.src = src
        self.device = next(decoder.parameters()).device
        self.row_decoder = RowParallelDecoder(decoder, group, dst=src)
        self.cache = self.row_decoder.initialize_autoregressive_cache()

    def __call__(
        self, latent: torch.Tensor | None, autoregressive_index: int
    ) -> torch.Tensor | None:
        latent = broadcast_latent(latent, src=self.src, group=self.group, device=self.device)
        return self.row_decoder(latent, autoregressive_index, self.cache)


class RowParallelDecodeSink(InlineDecodeSink):
    """The session sink of ``parallel.decode=parallel``: generate the latent, then every rank
    decodes a row slab of it (collective); the writing rank writes the assembled frames."""

    def __init__(
        self,
        writer: FrameWriter | None,
        decoder: Any,
        *,
        check_finite: bool = True,
        frame_check: FrameCheck | None = None,
    ) -> None:
        super().__init__(writer, check_finite=check_finite, frame_check=frame_check)
        if not getattr(decoder, "supports_row_slabs", False):
            raise ValueError(
                "parallel.decode=parallel needs a decoder that decodes row slabs (the Wan "
                f"2.1 / 2.2 VAE, TAEHV); this pipeline's is {type(decoder).__name__}"
            )
        self.chunk_decoder = ParallelChunkDecoder(decoder)

    def produce(self, pipeline: Any, index: int, cache: Any, control: Any = None) -> ProducedChunk:
        latent = pipeline.generate_latent(index, cache, *_control_argument(control))
        video = self.chunk_decoder(latent, index)  # every rank: its slab; rank 0: the frame
        return ProducedChunk(
            index=index,
            local_latent=pipeline.clean_latent(cache),
            latent=latent,
            latent_gathered=True,
            video=video,
        )
