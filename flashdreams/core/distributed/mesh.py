"""The context-parallel mesh: Ulysses groups of contiguous ranks, ring groups across them.

Rank layout for ``ulysses_degree = U`` and ``ring_degree = R`` (world ``U*R``)::

    rank = ring_index * U + ulysses_index

    Ulysses groups (rows):  [0 .. U-1], [U .. 2U-1], ...
    ring groups (columns):  [0, U, 2U, ...], [1, U+1, ...], ...

A token shard ``r`` (see :mod:`.sharding`) lives on rank ``r``, so each
Ulysses group holds one contiguous block of the sequence and the ring rotates
those blocks.

CFG parallelism (:func:`build_cfg_parallel_mesh`) runs the two classifier-free
guidance branches on the two halves of a world of ``2N`` ranks, each half a
CP mesh of ``N`` ranks laid out as above (ranks counted from the half's first
rank)::

    branch 0 (conditional):    ranks [0 .. N-1]
    branch 1 (unconditional):  ranks [N .. 2N-1]
    pair groups:               [0, N], [1, N+1], ..., [N-1, 2N-1]

Partners ``r`` and ``r + N`` hold the same token shard of different branches. The groups are created once, by every rank in the same order
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
    """Rank of this process inside its CP group (= its token-shard index): the global
    rank, except under CFG parallelism where it counts from the first rank of the half."""
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
        return _local_mesh(parallel_dims, 0 if rank is None else rank)
    import torch.distributed as dist

    world_size = _default_world_size(f"context parallel degree {parallel_dims.cp_degree}")
    if world_size != parallel_dims.world_size:
        raise ValueError(
            f"ParallelDims was built for world size {parallel_dims.world_size} but the "
            f"process group has {world_size} ranks"
        )
    rank = dist.get_rank() if rank is None else rank
    mesh = _create_cp_groups(parallel_dims, first_rank=0, rank=rank, world_size=world_size)
    assert mesh is not None
    return mesh


def build_leading_cp_mesh(parallel_dims: ParallelDims) -> ContextParallelMesh | None:
    """The CP groups of the first ``parallel_dims.world_size`` ranks of a larger world.

    Collective over the default group: the ranks after them (e.g. a dedicated decode
    rank) call it too and get ``None``.
    """
    import torch.distributed as dist

    world_size = _default_world_size(f"context parallel degree {parallel_dims.cp_degree}")
    assert parallel_dims.world_size < world_size, (parallel_dims, world_size)
    rank = dist.get_rank()
    return _create_cp_groups(parallel_dims, first_rank=0, rank=rank, world_size=world_size)


@dataclass(frozen=True)
class CFGParallelMesh:
    """The two CFG branches on the two halves of the world (see the module docstring).

    Each rank runs one branch on its half's CP mesh and, after every forward,
    exchanges its branch's prediction with its partner over ``pair_group``.
    """

    branch_index: int
    """CFG branch of this rank: 0 conditional (first half), 1 unconditional (second half)."""
    pair_group: ProcessGroup
    """The 2-rank group ``[r, r + N]`` of this rank and its partner (group rank = branch)."""
    cp_mesh: ContextParallelMesh
    """CP mesh of this rank's half; no groups when the half is one rank."""


def build_cfg_parallel_mesh(
    half_parallel_dims: ParallelDims, *, num_ranks: int | None = None
) -> CFGParallelMesh | None:
    """Create the CP groups of both halves and the partner pairs; collective.

    ``half_parallel_dims`` are the degrees of one half: its ``world_size`` must
    be half of ``num_ranks``, the leading ranks of the default group that run
    the two branches (all of them by default; the ranks after them get ``None``).
    Every rank creates every group, in the same order.
    """
    import torch.distributed as dist

    half_size = half_parallel_dims.world_size
    world_size = _default_world_size("CFG parallelism")
    num_ranks = world_size if num_ranks is None else num_ranks
    if num_ranks != 2 * half_size:
        raise ValueError(
            f"CFG parallelism needs a world of twice the CP degree of one branch: "
            f"{2 * half_size} ranks for ParallelDims of world size {half_size}, but the "
            f"process group has {world_size} ranks"
        )
    rank = dist.get_rank()
    branch_index, half_rank = divmod(rank, half_size)  # branch 2 and up: not a CFG rank
    cp_mesh = None
    for branch in (0, 1):
        mesh = _create_cp_groups(
            half_parallel_dims, first_rank=branch * half_size, rank=rank, world_size=world_size
        )
        if branch == branch_index:
            cp_mesh = mesh
    if cp_mesh is None:  # a one-rank half: no CP groups
        cp_mesh = _local_mesh(half_parallel_dims, half_rank)
    pair_group = None
    for index in range(half_size):
        ranks = [index, index + half_size]
        group = dist.group.WORLD if world_size == 2 else dist.new_group(ranks=ranks)
        if rank in ranks:
            pair_group = group
    if rank >= num_ranks:
        return None
    assert pair_group is not None
    return CFGParallelMesh(branch_index=branch_index, pair_group=pair_group, cp_mesh=cp_mesh)


def _local_mesh(parallel_dims: ParallelDims, rank: int) -> ContextParallelMesh:
    assert parallel_dims.cp_degree == 1, parallel_dims
    return ContextParallelMesh(
        parallel_dims=parallel_dims,
        rank=rank,
        cp_group=None,
        ulysses_group=None,
        ring_group=None,
    )


def _default_world_size(what: str) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{what} needs an initialised process group; call init_distributed() first"
        )
    return dist.get_world_size()


def _create_cp_groups(
    parallel_dims: ParallelDims, *, first_rank: int, rank: int, world_size: int
) -> ContextParallelMesh | None:
    """Create the CP groups of global ranks ``[first_rank, first_rank + cp_degree)``.

    Collective over the default group (``new_group`` is): every rank calls it
    for every block. Returns the mesh of ``rank`` if it is in the block, else
    ``None``; a one-rank block creates nothing.
    """
    import torch.distributed as dist

    cp_degree = parallel_dims.cp_degree
    if cp_degree == 1:
        return None

    def group_of(block_ranks: list[int], cp_group: ProcessGroup | None) -> ProcessGroup:
        if len(block_ranks) == world_size:
            return dist.group.WORLD
        if cp_group is not None and len(block_ranks) == cp_degree:
            return cp_group
        return dist.new_group(ranks=[first_rank + r for r in block_ranks])

    cp_group = group_of(list(range(cp_degree)), None)
    block_rank = rank - first_rank
    is_member = 0 <= block_rank < cp_degree
    ulysses_group = None
    ring_group = None
    if parallel_dims.ulysses_degree > 1:
        for block_ranks in ulysses_group_ranks(parallel_dims):
            group = group_of(block_ranks, cp_group)
            if block_rank in block_ranks:
                ulysses_group = group
    if parallel_dims.ring_degree > 1:
        for block_ranks in ring_group_ranks(parallel_dims):
            group = group_of(block_ranks, cp_group)
            if block_rank in block_ranks:
                ring_group = group
    if not is_member:
        return None
    return ContextParallelMesh(
        parallel_dims=parallel_dims,
        rank=block_rank,
        cp_group=cp_group,
        ulysses_group=ulysses_group,
        ring_group=ring_group,
    )
