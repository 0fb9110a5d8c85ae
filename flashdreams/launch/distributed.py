"""Process-group start-up for the launcher: single process, torchrun, or SLURM tasks.

The environment decides the layout:

* torchrun (or any launcher) exported ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
  and ``MASTER_ADDR`` / ``MASTER_PORT``;
* ``srun`` started one task per rank: ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
  ``SLURM_LOCALID``; the master is the first node of the job, the port is
  derived from the job id so concurrent jobs on one node do not collide;
* otherwise a single process without a process group.

This is the one place to swap in ``flashdreams.core.distributed`` later.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    """Global rank."""
    world_size: int
    """Number of ranks."""
    local_rank: int
    """Rank within the node (selects the GPU)."""
    initialized_here: bool
    """Whether this module created the process group (and must destroy it)."""


def _first_slurm_host() -> str:
    if int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1"))) == 1:
        return "127.0.0.1"
    node_list = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", node_list],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        return hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return node_list.split(",")[0].split("[")[0] or "127.0.0.1"


def export_slurm_env_as_torch_env() -> None:
    """Fill RANK/WORLD_SIZE/... from SLURM task variables when torchrun did not set them."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    num_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if "SLURM_PROCID" not in os.environ or num_tasks <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(num_tasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    job_id = int(os.environ.get("SLURM_JOB_ID", "0"))
    os.environ.setdefault("MASTER_PORT", str(20000 + job_id % 20000))


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistributedContext:
    """Join (or create) the default process group described by the environment."""
    import torch
    import torch.distributed as dist

    export_slurm_env_as_torch_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistributedContext(rank=0, world_size=1, local_rank=0, initialized_here=False)
    if dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            initialized_here=False,
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return DistributedContext(
        rank=rank, world_size=world_size, local_rank=local_rank, initialized_here=True
    )


def shutdown_distributed(context: DistributedContext) -> None:
    import torch.distributed as dist

    if context.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_rank0(value: object, context: DistributedContext) -> object:
    """Every rank gets rank 0's ``value`` (e.g. the run directory)."""
    if context.world_size <= 1:
        return value
    import torch.distributed as dist

    payload = [value]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]
