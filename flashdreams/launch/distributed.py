"""Process-group start-up for the launcher (thin layer over ``flashdreams.core.distributed``).

The environment decides the layout: torchrun variables, SLURM task variables
(``srun`` / submitit, one task per rank), or a single process. The launcher
adds only the rank-0 -> all broadcast used to agree on the run directory.
"""

from __future__ import annotations

from typing import Any

BACKEND_TO_DEVICE = {"auto": None, "gloo": "cpu", "nccl": "cuda"}
"""``parallel.backend`` -> the device ``core.distributed.init_distributed`` is asked for."""


def start_process_group(backend: str = "auto", timeout_s: float = 600.0) -> Any:
    """Join the process group the environment describes (``parallel.backend`` by name);
    returns a ``DistributedContext``."""
    from flashdreams.core.distributed import init_distributed as core_init_distributed

    if backend not in BACKEND_TO_DEVICE:
        raise ValueError(
            f"parallel.backend must be one of {', '.join(BACKEND_TO_DEVICE)}, got {backend!r}"
        )
    return core_init_distributed(timeout_s, device=BACKEND_TO_DEVICE[backend])


def broadcast_from_rank0(value: object, context: Any) -> object:
    """Every rank gets rank 0's ``value`` (e.g. the run directory)."""
    if context.world_size <= 1:
        return value
    import torch.distributed as dist

    payload = [value]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]
