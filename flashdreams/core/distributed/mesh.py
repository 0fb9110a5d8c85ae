"""The context-parallel mesh: Ulysses groups of contiguous ranks, ring groups across them.

Rank layout for ``ulysses_degree = U`` and ``ring_degree = R`` (world ``U*R``)::

    rank = ring_index * U + ulysses_index

    Ulysses groups (rows):  [0 .. U-1], [U .. 2U-1], ...
    ring groups (columns):  [0, U, 2U, ...], [1, U+1, ...], ...

A token shard ``r`` (see :mod:`.sharding`) lives on rank ``r``, so each
Ulysses group holds one contiguous block of the sequence and the ring rotates
those blocks. The groups are created once, by every rank in the same order
(``torch.distributed.new_group`` is collective), and handed to the modules
that communicate; nothing is stored in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flashdreams.core.distributed.parallel_dims import ParallelDims

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def ulysses_group_ranks(parallel_dims: ParallelDims) -> list[list[int]]:
    """Global ranks of every Ulysses group (contiguous blocks)."""
    u, r = parallel_dims.ulysses_degree, parallel_dims.ring_degree
    return [[ring * u + i for i in range(u)] for ring in range(r)]


def ring_group_ranks(parallel_dims: ParallelDims) -> list[list[int]]:
    """Global ranks of every ring group (stride ``ulysses_degree``)."""
    u, r = parallel_dims.ulysses_degree, parallel_dims.ring_degree
    return [[ring * u + i for ring in range(r)] for i in range(u)]


@dataclass(frozen=True)
class ContextParallelMesh:
    """Process groups and coordinates of this rank in the CP mesh.

    Groups are ``None`` when their degree is 1 (no communication needed);
    every CP primitive treats a ``None`` group as "run locally".
    """

    parallel_dims: ParallelDims
    """The validated degrees this mesh was built from."""
    rank: int
    """Global rank of this process (= its token-shard index)."""
    cp_group: ProcessGroup | None
    """All CP ranks, in token-shard order; used to gather latents on rank 0."""
    ulysses_group: ProcessGroup | None
    """This rank's Ulysses group, or ``None`` when ``ulysses_degree == 1``."""
    ring_group: ProcessGroup | None
    """This rank's ring group, or ``None`` when ``ring_degree == 1``."""

    @property
    def cp_degree(self) -> int:
        return self.parallel_dims.cp_degree

    @property
    def ulysses_degree(self) -> int:
        return self.parallel_dims.ulysses_degree

    @property
    def ring_degree(self) -> int:
        return self.parallel_dims.ring_degree

    @property
    def ulysses_rank(self) -> int:
        """Index of this rank inside its Ulysses group."""
        return self.rank % self.parallel_dims.ulysses_degree

    @property
    def ring_rank(self) -> int:
        """Index of this rank inside its ring group."""
        return self.rank // self.parallel_dims.ulysses_degree

    @property
    def method(self) -> str:
        return self.parallel_dims.method


def build_cp_mesh(parallel_dims: ParallelDims, rank: int | None = None) -> ContextParallelMesh:
    """Create the CP process groups; collective: every rank must call it.

    With ``cp_degree == 1`` no group is created and no process group is
    required. Otherwise the default process group must exist and its world
    size must equal ``parallel_dims.world_size``.
    """
    if parallel_dims.cp_degree == 1:
        return ContextParallelMesh(
            parallel_dims=parallel_dims,
            rank=0 if rank is None else rank,
            cp_group=None,
            ulysses_group=None,
            ring_group=None,
        )
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError(
            f"context parallel degree {parallel_dims.cp_degree} needs an initialised process "
            "group; call init_distributed() first"
        )
    world_size = dist.get_world_size()
    if world_size != parallel_dims.world_size:
        raise ValueError(
            f"ParallelDims was built for world size {parallel_dims.world_size} but the "
            f"process group has {world_size} ranks"
        )
    rank = dist.get_rank() if rank is None else rank
    cp_group = dist.group.WORLD
    ulysses_group = None
    ring_group = None
    # new_group is collective over the default group: every rank creates every group.
    if parallel_dims.ulysses_degree > 1:
        for ranks in ulysses_group_ranks(parallel_dims):
            group = dist.new_group(ranks=ranks) if len(ranks) < world_size else cp_group
            if rank in ranks:
                ulysses_group = group
    if parallel_dims.ring_degree > 1:
        for ranks in ring_group_ranks(parallel_dims):
            group = dist.new_group(ranks=ranks) if len(ranks) < world_size else cp_group
            if rank in ranks:
                ring_group = group
    return ContextParallelMesh(
        parallel_dims=parallel_dims,
        rank=rank,
        cp_group=cp_group,
        ulysses_group=ulysses_group,
        ring_group=ring_group,
    )
