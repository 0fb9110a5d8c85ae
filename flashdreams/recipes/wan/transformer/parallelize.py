"""Parallelism applied to a Wan transformer from outside: token sharding and the CFG exchange.

The Wan transformer holds layout, forward and CFG math; everything that
depends on how ranks are used lives here and is driven by the run's
:class:`~flashdreams.core.distributed.plan.ParallelPlan`:

* which token slots of a chunk this rank holds (``ceil(L / N)`` per rank,
  padding at the end), for latents, noise and RoPE frequencies;
* noise drawn globally and split, so every rank's generator advances alike and
  a CP run reproduces the single-process draw;
* the gather of the clean latent on the output rank;
* the CFG-parallel exchange: partner ranks swap their branch's flow and both
  apply the guidance.

Shape legend: ``L`` tokens per chunk (all ranks), ``L_rank`` this rank's
slots, ``D`` channels per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from flashdreams.core.distributed.plan import ParallelPlan
from flashdreams.core.distributed.sharding import gather_tokens, slots_per_rank, split_tokens
from flashdreams.infra.diffusion.noise import NoiseSource, entry_shape, randn_entries

if TYPE_CHECKING:
    from flashdreams.core.distributed.mesh import ContextParallelMesh


class WanTokenParallel:
    """The plan as seen by one Wan transformer: its CP mesh and its CFG branch.

    Args:
        plan: the run's parallel plan.
        cp_method: the network's ``cp_method`` (used when the plan gives no degrees).
        num_heads: attention heads of the network (the Ulysses degree must divide them).
    """

    def __init__(self, plan: ParallelPlan, *, cp_method: Any, num_heads: int) -> None:
        self.plan = plan
        self.mesh: ContextParallelMesh | None = plan.mesh_for(
            cp_method=cp_method, num_heads=num_heads
        )
        """CP mesh this transformer attends over; ``None``: no context parallelism."""

    @property
    def cfg_parallel(self) -> bool:
        """Whether the CFG branches run on separate halves of the ranks."""
        return self.plan.cfg is not None

    @property
    def cfg_branch(self) -> int | None:
        """This rank's CFG branch under ``cfg_parallel`` (0 cond, 1 uncond), else ``None``."""
        return self.plan.cfg_branch

    def num_local_tokens(self, num_tokens: int) -> int:
        """Token slots of this rank per chunk: ``ceil(L / N)`` under CP (padding included)."""
        if self.mesh is None:
            return num_tokens
        return slots_per_rank(num_tokens, self.mesh.cp_degree)

    def split(self, tokens: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """This rank's slots of a global token tensor (token axis ``dim``)."""
        if self.mesh is None:
            return tokens
        return split_tokens(tokens, dim, self.mesh.rank, self.mesh.cp_degree)

    def randn_tokens(
        self,
        global_shape: tuple[int, ...],
        rng: NoiseSource,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Noise ``[..., L, D]`` drawn whole on every rank, then this rank's ``[..., L_rank, D]``
        (one generator per batched rollout: each draws its own rows)."""
        shape = entry_shape(tuple(global_shape), rng)
        noise = randn_entries(shape, rng, device=device, dtype=dtype)
        return self.split(noise)

    def gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
        """``[..., L_rank, D]`` shards -> ``[..., L, D]`` on the output rank, ``None`` elsewhere.

        Under ``cfg_parallel`` the unconditional half holds the same latent as the
        conditional one: it skips the gather.
        """
        if self.cfg_branch not in (None, 0):
            return None
        if self.mesh is None:
            return tokens
        return gather_tokens(tokens, -2, num_tokens, self.mesh.cp_group, dst=0)

    def exchange_and_guide(self, branch_flow: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """CFG-parallel guidance: ``[B, L_rank, D]`` flow of this rank's branch -> guided flow.

        One all-gather on the partner pair (group rank = branch: 0 cond, 1 uncond);
        both partners then compute the same ``uncond + s * (cond - uncond)`` in fp32.
        """
        import torch.distributed as dist

        assert self.plan.cfg is not None, "exchange_and_guide needs cfg_parallel"
        branch_flow = branch_flow.contiguous()
        gathered = [torch.empty_like(branch_flow) for _ in range(2)]
        dist.all_gather(gathered, branch_flow, group=self.plan.cfg.pair_group)
        cond, uncond = (flow.float() for flow in gathered)
        return uncond + guidance_scale * (cond - uncond)
