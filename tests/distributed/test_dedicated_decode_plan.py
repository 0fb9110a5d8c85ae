"""``build_parallel_plan(decode="dedicated")`` on gloo ranks: the CP and CFG groups cover all
ranks but the last, which only decodes."""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashdreams.core.distributed.plan import build_parallel_plan
from flashdreams.testing import run_on_ranks


def _plans_on_rank(rank: int, world_size: int) -> None:
    plan = build_parallel_plan(decode="dedicated")
    decode_rank = world_size - 1
    assert (plan.world_size, plan.rank, plan.decode_rank) == (world_size, rank, decode_rank)
    assert plan.is_decode_rank == (rank == decode_rank)
    assert plan.holds_output == (rank == 0)
    assert plan.num_dit_ranks == 2
    if plan.is_decode_rank:
        assert plan.cp_mesh is None and plan.dit_group is None
    else:
        assert plan.cp_degree == 2 and plan.cp_mesh.rank == rank
        flag = torch.tensor([rank + 1])
        dist.all_reduce(flag, group=plan.dit_group)  # the DiT ranks' stop checks
        assert int(flag) == 3
    cfg_plan = build_parallel_plan(cfg_parallel=True, ulysses_degree=1, decode="dedicated")
    if rank == decode_rank:
        assert cfg_plan.cfg is None and cfg_plan.is_decode_rank
    else:
        assert cfg_plan.cfg_branch == rank and cfg_plan.cp_mesh is None
        assert cfg_plan.holds_output == (rank == 0)
    assert cfg_plan.describe()["decode_rank"] == decode_rank


def test_dedicated_plan_on_three_ranks():
    run_on_ranks(_plans_on_rank, 3)
