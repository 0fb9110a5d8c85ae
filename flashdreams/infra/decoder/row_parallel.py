"""Exact parallel decode: every rank of a group decodes one row slab of each frame.

:class:`RowParallelDecoder` wraps a streaming video decoder whose cache accepts
a ``rows`` argument (the Wan 2.1 / 2.2 VAE and TAEHV decoders): each rank slices
its latent rows, decodes them with the slab's own streaming cache (convolutions
exchange halo rows with the neighbouring ranks, the Wan VAE's middle attention
gathers keys and values of the whole frame), and the pixel slabs are gathered on
one rank. The video equals the one-rank decode, for any split of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flashdreams.core.distributed.comm_stats import CommStats
from flashdreams.core.distributed.row_slabs import HaloRecord, RowSlabGroup
from flashdreams.infra.decoder.base import StreamingDecoderCache, StreamingVideoDecoder


@dataclass(kw_only=True)
class RowParallelDecodeCache:
    """Per-rollout state of a :class:`RowParallelDecoder` (built at the first chunk)."""

    slabs: RowSlabGroup | None = None
    """This rank's slab of the frame; set from the first latent's height."""
    decoder_cache: StreamingDecoderCache | None = None
    """The wrapped decoder's streaming cache for this rank's slab."""


class RowParallelDecoder:
    """Decode on every rank of ``group``, one row slab each; the pixels are assembled on ``dst``.

    Every rank calls it with the same whole latent ``[..., Tl, Cl, Hl, Wl]``; rank
    ``dst`` of the group gets the whole video ``[..., T, 3, H, W]``, the other ranks
    ``None``. ``Hl`` needs at least one row per rank; it need not divide evenly.
    """

    def __init__(
        self,
        decoder: StreamingVideoDecoder,
        group: dist.ProcessGroup | None,
        *,
        dst: int = 0,
        comm_stats: CommStats | None = None,
        halo_log: list[HaloRecord] | None = None,
    ) -> None:
        if not decoder.supports_row_slabs:
            raise ValueError(
                f"parallel decode needs a decoder that decodes row slabs (the Wan 2.1 / 2.2 VAE, "
                f"TAEHV); {type(decoder).__name__} does not"
            )
        self.decoder = decoder
        self.group = group
        self.dst = dst
        self.comm_stats = comm_stats
        self.halo_log = halo_log

    def initialize_autoregressive_cache(self, **context: Any) -> RowParallelDecodeCache:
        return RowParallelDecodeCache()

    def slab_of(self, latent: torch.Tensor, cache: RowParallelDecodeCache) -> torch.Tensor:
        """This rank's rows of ``latent`` (building the slabs at the first chunk)."""
        if cache.slabs is None:
            cache.slabs = RowSlabGroup.for_height(
                latent.shape[-2], self.group, comm_stats=self.comm_stats, halo_log=self.halo_log
            )
            cache.decoder_cache = self.decoder.initialize_autoregressive_cache(rows=cache.slabs)
        begin, end = cache.slabs.latent_row_range
        if sum(cache.slabs.latent_rows) != latent.shape[-2]:
            raise ValueError(
                f"parallel decode: the latent height changed within a rollout "
                f"({sum(cache.slabs.latent_rows)} -> {latent.shape[-2]} rows)"
            )
        return latent[..., begin:end, :]

    @torch.no_grad()
    def __call__(
        self,
        latent: torch.Tensor,
        autoregressive_index: int = 0,
        cache: RowParallelDecodeCache | None = None,
    ) -> torch.Tensor | None:
        if cache is None:
            cache = self.initialize_autoregressive_cache()
        slab = self.slab_of(latent, cache)
        pixels = self.decoder(slab, autoregressive_index, cache.decoder_cache)
        assert cache.slabs is not None
        return cache.slabs.gather_rows(pixels, dst=self.dst)
