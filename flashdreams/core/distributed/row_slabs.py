"""Row slabs of a frame across the ranks of a group: halo exchange and row gathers.

A decoder that runs spatially parallel keeps one horizontal slab of rows of
every frame on each rank. Rank ``r`` holds latent rows ``[starts[r], starts[r + 1])``;
every layer of the decoder scales all slabs by the same factor (upsampling
doubles each slab), so a slab's height at any layer is its latent height times
the layer's scale, and the row counts never need to be sent.

- :meth:`RowSlabGroup.exchange_rows` / :meth:`RowSlabGroup.pad_rows` give a slab the
  ``num_rows`` boundary rows of its neighbours above and below (zeros at the frame's top
  and bottom edge), so a convolution without height padding yields exactly the slab's
  rows of the whole-frame convolution.
- :meth:`RowSlabGroup.all_gather_rows` assembles the whole frame on every rank
  (layers that see the whole frame: attention keys and values).
- :meth:`RowSlabGroup.gather_rows` assembles it on one rank only (the pixels).

Rows are dim ``-2`` of every tensor (``[..., rows, width]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from flashdreams.core.distributed.comm_stats import CommStats


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The channels-last format ``x`` is in, else the default layout."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if (
        channels_last is not None
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=channels_last)
    ):
        return channels_last
    return torch.contiguous_format


def split_rows(num_rows: int, num_slabs: int) -> list[int]:
    """Rows per slab, as even as possible, the first slabs one row taller when it does not divide."""
    if num_slabs < 1:
        raise ValueError(f"num_slabs must be >= 1; got {num_slabs}")
    if num_rows < num_slabs:
        raise ValueError(
            f"a frame of {num_rows} latent rows cannot be split into {num_slabs} row slabs "
            f"(every rank needs at least one row)"
        )
    base, extra = divmod(num_rows, num_slabs)
    return [base + (1 if index < extra else 0) for index in range(num_slabs)]


class RowSlabs(Protocol):
    """What a decoder holding one row slab of each frame needs from the other slabs
    (:class:`RowSlabGroup` implements it); rows are dim -2."""

    def exchange_rows(self, x: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``num_rows`` rows of the neighbouring slabs above and below (zeros at the edges)."""
        ...

    def pad_rows(self, x: torch.Tensor, num_rows: int) -> torch.Tensor:
        """``x`` with ``num_rows`` rows of the neighbouring slabs above and below (zeros at the edges)."""
        ...

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The whole frame: every slab stacked in order along rows."""
        ...


@dataclass
class HaloRecord:
    """One halo exchange as seen by this rank (for tests and bench/bench_parallel_decode.py)."""

    shape: tuple[int, ...]
    """Shape of the slab before padding."""
    num_rows: int
    """Halo rows asked for on each side."""
    bytes_sent: int
    """Bytes this rank sent to its neighbours."""


@dataclass
class RowSlabGroup:
    """This rank's place among the row slabs of a frame, and the collectives the decoders need.

    Built by the caller for one frame height (:meth:`for_height`); the group is
    passed in, never looked up.
    """

    group: dist.ProcessGroup | None
    """Process group whose ranks hold the slabs, in rank order from the top."""
    rank: int
    """This rank's index in ``group``."""
    latent_rows: list[int]
    """Latent rows of every rank's slab (rank order)."""
    comm_stats: CommStats | None = None
    """Optional byte counter (``"halo"``, ``"gather_rows"``)."""
    halo_log: list[HaloRecord] | None = None
    """Optional per-exchange log (one entry per :meth:`exchange_rows` call)."""
    _global_ranks: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size} slabs")
        self._global_ranks = [
            rank if self.group is None else dist.get_global_rank(self.group, rank)
            for rank in range(self.world_size)
        ]

    @classmethod
    def for_height(
        cls,
        latent_height: int,
        group: dist.ProcessGroup | None,
        *,
        comm_stats: CommStats | None = None,
        halo_log: list[HaloRecord] | None = None,
    ) -> RowSlabGroup:
        """Slabs of a ``latent_height``-row frame over ``group`` (the default group when ``None``)."""
        world_size = dist.get_world_size(group)
        return cls(
            group=group,
            rank=dist.get_rank(group),
            latent_rows=split_rows(latent_height, world_size),
            comm_stats=comm_stats,
            halo_log=halo_log,
        )

    @property
    def world_size(self) -> int:
        return len(self.latent_rows)

    @property
    def latent_row_range(self) -> tuple[int, int]:
        """``[begin, end)`` of this rank's latent rows."""
        begin = sum(self.latent_rows[: self.rank])
        return begin, begin + self.latent_rows[self.rank]

    def slab_rows(self, x: torch.Tensor) -> list[int]:
        """Every rank's row count at the scale of ``x`` (this rank's slab)."""
        own = self.latent_rows[self.rank]
        scale, remainder = divmod(x.shape[-2], own)
        assert remainder == 0, f"slab of {x.shape[-2]} rows is not a multiple of {own}"
        return [rows * scale for rows in self.latent_rows]

    def _count(self, name: str, *tensors: torch.Tensor) -> None:
        if self.comm_stats is not None:
            for tensor in tensors:
                self.comm_stats.add_tensor(name, tensor)

    def exchange_rows(self, x: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``num_rows`` rows above this slab (the bottom of the slab above) and below it.

        Zeros at the frame's top and bottom edge (a convolution's zero padding);
        each is ``[..., num_rows, w]``.
        """
        if num_rows > x.shape[-2]:
            raise ValueError(
                f"a halo of {num_rows} rows needs slabs of at least {num_rows} rows; this "
                f"rank holds {x.shape[-2]} (use fewer ranks or a taller frame)"
            )
        halo_shape = (*x.shape[:-2], num_rows, x.shape[-1])
        above = x.new_zeros(halo_shape)
        below = x.new_zeros(halo_shape)
        sends: list[torch.Tensor] = []
        operations: list[dist.P2POp] = []
        for neighbour, edge, received in (
            (self.rank - 1, x[..., :num_rows, :], above),
            (self.rank + 1, x[..., -num_rows:, :], below),
        ):
            if 0 <= neighbour < self.world_size:
                peer = self._global_ranks[neighbour]
                sends.append(edge.contiguous())
                operations.append(dist.P2POp(dist.isend, sends[-1], peer, self.group))
                operations.append(dist.P2POp(dist.irecv, received, peer, self.group))
        # One batch: NCCL needs the sends and receives of both neighbours grouped.
        for request in dist.batch_isend_irecv(operations) if operations else []:
            request.wait()
        self._count("halo", *sends)
        if self.halo_log is not None:
            self.halo_log.append(
                HaloRecord(
                    shape=tuple(x.shape),
                    num_rows=num_rows,
                    bytes_sent=sum(t.numel() * t.element_size() for t in sends),
                )
            )
        return above, below

    def pad_rows(self, x: torch.Tensor, num_rows: int) -> torch.Tensor:
        """``x`` with ``num_rows`` rows of the slab above on top and of the slab below underneath.

        ``[..., h, w] -> [..., num_rows + h + num_rows, w]``, in ``x``'s memory layout
        (channels-last stays channels-last); see :meth:`exchange_rows`.
        """
        if num_rows == 0:
            return x
        above, below = self.exchange_rows(x, num_rows)
        padded = torch.empty(
            (*x.shape[:-2], num_rows + x.shape[-2] + num_rows, x.shape[-1]),
            dtype=x.dtype,
            device=x.device,
            memory_format=_memory_format(x),
        )
        padded[..., :num_rows, :] = above
        padded[..., num_rows:-num_rows, :] = x
        padded[..., -num_rows:, :] = below
        return padded

    def _padded_slab(self, x: torch.Tensor, max_rows: int) -> torch.Tensor:
        """``x`` contiguous, zero-filled at the bottom to ``max_rows`` rows (gloo gathers equal sizes)."""
        padded = x.new_zeros((*x.shape[:-2], max_rows, x.shape[-1]))
        padded[..., : x.shape[-2], :] = x
        return padded

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The whole frame on every rank: the slabs of all ranks stacked in rank order along rows."""
        rows = self.slab_rows(x)
        padded = self._padded_slab(x, max(rows))
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded, group=self.group)
        self._count("all_gather_rows", padded)
        return torch.cat([part[..., :num_rows, :] for part, num_rows in zip(parts, rows)], dim=-2)

    def gather_rows(self, x: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """The whole frame on rank ``dst`` of the group (``None`` on the others)."""
        rows = self.slab_rows(x)
        padded = self._padded_slab(x, max(rows))
        parts = [torch.empty_like(padded) for _ in rows] if self.rank == dst else None
        dist.gather(padded, parts, dst=self._global_ranks[dst], group=self.group)
        self._count("gather_rows", padded)
        if parts is None:
            return None
        return torch.cat([part[..., :num_rows, :] for part, num_rows in zip(parts, rows)], dim=-2)
