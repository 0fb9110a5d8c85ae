"""The one parallel plan of a run: how the ranks are used, decided once.

A run's ``parallel:`` section (``flashdreams.launch.run_config.ParallelConfig``)
says how the world is split: Ulysses x ring degrees of context parallelism (CP)
and whether the two classifier-free-guidance branches run on separate halves of
the ranks. :func:`build_parallel_plan` validates those settings once (through
:class:`~flashdreams.core.distributed.parallel_dims.ParallelDims`), creates the
process groups once (collective) and returns a :class:`ParallelPlan`, which
the launcher hands down to the model. Model code only reads the plan; a
``cp_mesh`` of ``None`` is the one spelling of "no context parallelism".

A Python user who passes no plan gets :func:`build_parallel_plan` with the
defaults: the CP size is the world size ``torch.distributed`` reports (one rank
without a process group), the reference behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from flashdreams.core.distributed.mesh import (
    CFGParallelMesh,
    ContextParallelMesh,
    build_cfg_parallel_mesh,
    build_cp_mesh,
    build_leading_cp_mesh,
)
from flashdreams.core.distributed.parallel_dims import ParallelDims

CPMethod = Literal["ring", "ulysses"]
DecodePlan = Literal["rank0", "parallel", "dedicated"]
DECODE_PLANS: tuple[str, ...] = ("rank0", "parallel", "dedicated")

DEDICATED_DECODE_NEEDS_TWO_RANKS = (
    "parallel.decode=dedicated needs at least 2 ranks (the last rank decodes while the "
    "others run the DiT); this job has {world_size}. Use parallel.decode=rank0, or start "
    "2 or more ranks (torchrun --nproc_per_node=2)"
)
DEDICATED_DECODE_CFG_PARALLEL = (
    "parallel.decode=dedicated with parallel.cfg_parallel=true needs an odd world size: "
    "an even number of DiT ranks (one half per CFG branch) plus the decode rank; got "
    "world size {world_size}"
)


@dataclass(frozen=True)
class ParallelPlan:
    """How this rank takes part in the run; built once, read by every layer below.

    Build it with :func:`build_parallel_plan` (collective), or from a mesh you
    built yourself with :meth:`from_mesh`.
    """

    world_size: int = 1
    """Ranks in the job."""
    rank: int = 0
    """Global rank of this process."""
    cp_mesh: ContextParallelMesh | None = None
    """Context-parallel mesh of this rank's CP group; ``None``: no context parallelism."""
    cfg: CFGParallelMesh | None = None
    """CFG-parallel layout (branch of this rank, partner group); ``None``: both CFG branches
    run batched on every rank."""
    degrees_given: bool = True
    """False when the user set neither CP degree: the network's ``cp_method`` then picks
    ring or Ulysses over the CP group (no new groups are needed for either)."""
    decode: DecodePlan = "rank0"
    """Which ranks turn each chunk's latent into pixels: ``rank0`` (the rank holding the
    gathered latent decodes whole frames), ``parallel`` (every rank decodes one row
    slab of each frame, exactly; rank 0 assembles them) or ``dedicated`` (the last rank
    only decodes, one chunk behind the DiT ranks)."""
    decode_rank: int | None = None
    """Global rank that only decodes (``dedicated``: the last one), else ``None``."""
    dit_group: Any = None
    """Process group of the ranks that run the DiT when they are not the whole world
    (``dedicated`` with 3 or more ranks; their stop checks agree over it), else ``None``."""

    @classmethod
    def from_mesh(cls, mesh: ContextParallelMesh | None) -> ParallelPlan:
        """A plan around an explicit CP mesh (``None`` or a one-rank mesh: no CP)."""
        if mesh is None or mesh.cp_degree == 1:
            return cls()
        return cls(world_size=mesh.cp_degree, rank=mesh.rank, cp_mesh=mesh)

    @property
    def cp_degree(self) -> int:
        """Ranks sharing one chunk's tokens (1 without CP)."""
        return 1 if self.cp_mesh is None else self.cp_mesh.cp_degree

    @property
    def cfg_branch(self) -> int | None:
        """CFG branch of this rank under ``cfg_parallel`` (0 cond, 1 uncond), else ``None``."""
        return None if self.cfg is None else self.cfg.branch_index

    @property
    def holds_output(self) -> bool:
        """True on the ranks whose gathered latent is the run's output (CP rank 0 of the
        conditional half; never the decode rank)."""
        if self.is_decode_rank:
            return False
        cp_rank = 0 if self.cp_mesh is None else self.cp_mesh.rank
        return cp_rank == 0 and self.cfg_branch in (None, 0)

    @property
    def is_decode_rank(self) -> bool:
        """True on the rank that only decodes (``dedicated``)."""
        return self.decode_rank is not None and self.rank == self.decode_rank

    @property
    def num_dit_ranks(self) -> int:
        """Ranks that run the DiT (all but the decode rank)."""
        return self.world_size - (self.decode_rank is not None)

    def mesh_for(self, *, cp_method: CPMethod, num_heads: int) -> ContextParallelMesh | None:
        """The CP mesh a network with ``num_heads`` heads attends over; validates the heads.

        When the plan was built without degrees, ``cp_method`` makes the CP group one
        ring or one Ulysses group (the same process group either way).
        """
        mesh = self.cp_mesh
        if mesh is None:
            return None
        ulysses_degree = mesh.ulysses_degree
        if not self.degrees_given:
            ulysses_degree = mesh.cp_degree if cp_method == "ulysses" else 1
        try:
            dims = ParallelDims(mesh.cp_degree, ulysses_degree=ulysses_degree, num_heads=num_heads)
        except ValueError as error:
            raise ValueError(f"{self._cfg_prefix()}{error}") from None
        if dims.ulysses_degree == mesh.ulysses_degree:
            return mesh
        return _one_level_mesh(mesh, dims)

    def describe(self) -> dict[str, Any]:
        """Plain-data layout for ``stats.json``."""
        layout: dict[str, Any] = {"world_size": self.world_size, "cp_size": self.cp_degree}
        if self.cp_mesh is not None and self.degrees_given:
            layout["ulysses_size"] = self.cp_mesh.ulysses_degree
            layout["ring_size"] = self.cp_mesh.ring_degree
        layout["cfg_parallel"] = self.cfg is not None
        layout["decode"] = self.decode
        if self.decode_rank is not None:
            layout["dit_ranks"] = self.num_dit_ranks
            layout["decode_rank"] = self.decode_rank
        return layout

    def _cfg_prefix(self) -> str:
        if self.cfg is None:
            return ""
        return (
            f"cfg_parallel=True: each CFG branch runs context parallel on {self.cp_degree} of "
            f"the {self.world_size} ranks: "
        )


def _one_level_mesh(mesh: ContextParallelMesh, dims: ParallelDims) -> ContextParallelMesh:
    """``mesh``'s CP group used as one ring (``dims.ulysses_degree == 1``) or one Ulysses group."""
    assert dims.ulysses_degree in (1, dims.cp_degree), dims
    group = mesh.cp_group
    return ContextParallelMesh(
        parallel_dims=dims,
        rank=mesh.rank,
        cp_group=group,
        ulysses_group=group if dims.ulysses_degree > 1 else None,
        ring_group=group if dims.ring_degree > 1 else None,
    )


def build_parallel_plan(
    *,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
    cfg_parallel: bool = False,
    decode: DecodePlan = "rank0",
) -> ParallelPlan:
    """Validate the degrees against the world and create the process groups, once.

    Args:
        ulysses_degree, ring_degree: CP degrees inside one CP group (the world, or
            half of it with ``cfg_parallel``); both ``None`` lets the network's
            ``cp_method`` choose pure ring or pure Ulysses.
        cfg_parallel: one CFG branch per half of the ranks.
        decode: the decode plan (:attr:`ParallelPlan.decode`).

    Collective: every rank calls it, in the same order. Without an initialised
    process group (or with one rank) the plan is "no parallelism", except that
    ``cfg_parallel`` then fails: it needs an even number of ranks, and so does
    ``decode="dedicated"``: it needs two ranks or more.

    With ``decode="dedicated"`` the last rank only decodes: the CP (and CFG) groups
    cover the other ranks, and the plan of the last rank has neither.
    """
    if decode not in DECODE_PLANS:
        raise ValueError(
            f"parallel.decode must be one of {', '.join(DECODE_PLANS)}; got {decode!r}"
        )
    if decode == "dedicated":
        return _build_dedicated_plan(ulysses_degree, ring_degree, cfg_parallel)
    plan = _build_groups(ulysses_degree, ring_degree, cfg_parallel)
    return replace(plan, decode=decode)


def _build_groups(
    ulysses_degree: int | None, ring_degree: int | None, cfg_parallel: bool
) -> ParallelPlan:
    world_size, rank = _world()
    degrees = ParallelDegrees(ulysses_degree, ring_degree)
    degrees_given = ulysses_degree is not None or ring_degree is not None
    if cfg_parallel:
        return _build_cfg_parallel_plan(degrees, world_size, degrees_given)
    dims = degrees.dims(world_size)
    if world_size == 1:
        return ParallelPlan(degrees_given=degrees_given)
    return ParallelPlan(
        world_size=world_size,
        rank=rank,
        cp_mesh=build_cp_mesh(dims),
        degrees_given=degrees_given,
    )


def _build_dedicated_plan(
    ulysses_degree: int | None, ring_degree: int | None, cfg_parallel: bool
) -> ParallelPlan:
    """Ranks ``0 .. N-2`` run the DiT (CP / CFG groups among themselves); rank ``N-1`` decodes."""
    import torch.distributed as dist

    world_size, rank = _world()
    if world_size < 2:
        raise ValueError(DEDICATED_DECODE_NEEDS_TWO_RANKS.format(world_size=world_size))
    num_dit_ranks = world_size - 1
    if cfg_parallel and num_dit_ranks % 2 != 0:
        raise ValueError(DEDICATED_DECODE_CFG_PARALLEL.format(world_size=world_size))
    degrees = ParallelDegrees(ulysses_degree, ring_degree)
    degrees_given = ulysses_degree is not None or ring_degree is not None
    decode_rank = world_size - 1
    if cfg_parallel:
        plan = _build_cfg_parallel_plan(degrees, num_dit_ranks, degrees_given, world_size)
    else:
        dims = degrees.dims(num_dit_ranks)
        cp_mesh = build_leading_cp_mesh(dims) if num_dit_ranks > 1 else None
        plan = ParallelPlan(rank=rank, cp_mesh=cp_mesh, degrees_given=degrees_given)
    dit_group = None
    if num_dit_ranks > 1:  # collective: the decode rank creates it too
        dit_group = dist.new_group(ranks=list(range(num_dit_ranks)))
    if rank == decode_rank:
        plan = ParallelPlan(degrees_given=degrees_given)
    return replace(
        plan,
        world_size=world_size,
        rank=rank,
        decode="dedicated",
        decode_rank=decode_rank,
        dit_group=dit_group if rank != decode_rank else None,
    )


def _build_cfg_parallel_plan(
    degrees: ParallelDegrees,
    world_size: int,
    degrees_given: bool,
    num_ranks_in_job: int | None = None,
) -> ParallelPlan:
    """The CFG-parallel plan over the first ``world_size`` ranks of the job (all by
    default); the ranks after them get a plan without groups."""
    if world_size % 2 != 0:
        raise ValueError(
            "cfg_parallel=True needs an even world size (one half of the ranks per CFG "
            f"branch); got world size {world_size}"
        )
    half_size = world_size // 2
    try:
        half_dims = degrees.dims(half_size)
    except ValueError as error:
        raise ValueError(
            f"cfg_parallel=True: each CFG branch runs context parallel on {half_size} of the "
            f"{world_size} ranks: {error}"
        ) from None
    cfg = build_cfg_parallel_mesh(half_dims, num_ranks=world_size)
    if cfg is None:
        assert num_ranks_in_job is not None and num_ranks_in_job > world_size
        return ParallelPlan(degrees_given=degrees_given)
    cp_mesh = cfg.cp_mesh if cfg.cp_mesh.cp_degree > 1 else None
    return ParallelPlan(
        world_size=world_size,
        rank=cfg.branch_index * half_size + cfg.cp_mesh.rank,
        cp_mesh=cp_mesh,
        cfg=cfg,
        degrees_given=degrees_given,
    )


@dataclass(frozen=True)
class ParallelDegrees:
    """The requested CP degrees, before they meet a world size."""

    ulysses_degree: int | None
    """Ranks per Ulysses group, or ``None``."""
    ring_degree: int | None
    """Ranks per ring group, or ``None``."""

    def dims(self, cp_degree: int) -> ParallelDims:
        """Validated degrees of a CP group of ``cp_degree`` ranks (pure ring by default)."""
        return ParallelDims(
            cp_degree, ulysses_degree=self.ulysses_degree, ring_degree=self.ring_degree
        )


def _world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(), dist.get_rank()
