"""Distributed start-up, the context-parallel mesh and token sharding.

Nothing here keeps process groups in module globals: :func:`init_distributed`
returns a :class:`DistributedContext`, :func:`build_cp_mesh` returns a
:class:`ContextParallelMesh` (:func:`build_cfg_parallel_mesh` one per CFG
branch, plus the partner pairs), and callers pass the groups on explicitly.
"""

from flashdreams.core.distributed.comm_stats import CommStats
from flashdreams.core.distributed.env import (
    DistributedContext,
    LaunchEnvironment,
    expand_slurm_nodelist,
    init_distributed,
    parse_launch_environment,
    shutdown_distributed,
)
from flashdreams.core.distributed.mesh import (
    CFGParallelMesh,
    ContextParallelMesh,
    build_cfg_parallel_mesh,
    build_cp_mesh,
    ring_group_ranks,
    ulysses_group_ranks,
)
from flashdreams.core.distributed.parallel_dims import ParallelDims, divisors
from flashdreams.core.distributed.sharding import (
    all_gather_tokens,
    gather_tokens,
    local_token_count,
    pad_tokens,
    slots_per_rank,
    split_tokens,
    token_valid_mask,
)

__all__ = [
    "CFGParallelMesh",
    "CommStats",
    "ContextParallelMesh",
    "DistributedContext",
    "LaunchEnvironment",
    "ParallelDims",
    "all_gather_tokens",
    "build_cfg_parallel_mesh",
    "build_cp_mesh",
    "divisors",
    "expand_slurm_nodelist",
    "gather_tokens",
    "init_distributed",
    "local_token_count",
    "pad_tokens",
    "parse_launch_environment",
    "ring_group_ranks",
    "shutdown_distributed",
    "slots_per_rank",
    "split_tokens",
    "token_valid_mask",
    "ulysses_group_ranks",
]
