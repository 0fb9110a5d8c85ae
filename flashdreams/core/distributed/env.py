"""Process-group start-up and shutdown from the launch environment.

Three ways a run can start:

* ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``);
* ``srun`` without torchrun: ``SLURM_PROCID``, ``SLURM_NTASKS`` (or
  ``SLURM_STEP_NUM_TASKS``), ``SLURM_LOCALID``; the master address is the first
  host of the job's node list and the port comes from ``MASTER_PORT`` or is
  derived from the job id;
* a single process: no process group is created.

:func:`parse_launch_environment` is a pure function of the environment so it
can be tested without starting anything; :func:`init_distributed` acts on it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch

LaunchKind = Literal["torchrun", "slurm", "single"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where this process sits in the job, as read from environment variables."""

    kind: LaunchKind
    """How the job was started: ``"torchrun"``, ``"slurm"`` or ``"single"``."""
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank of this process on its node (selects the GPU)."""
    master_addr: str | None = None
    """Rendezvous host (``None`` for a single process)."""
    master_port: int | None = None
    """Rendezvous port (``None`` for a single process)."""


@dataclass(frozen=True)
class DistributedContext:
    """Result of :func:`init_distributed`: this rank, the device and the backend."""

    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes; 1 when no process group exists."""
    local_rank: int
    """Rank on this node."""
    device: torch.device
    """Device this rank computes on (``cuda:<local_rank>`` or ``cpu``)."""
    backend: str | None
    """Process-group backend string, or ``None`` without a process group."""
    launch_kind: LaunchKind
    """How the job was started."""
    initialized_here: bool
    """True when :func:`init_distributed` created the default process group."""

    @property
    def is_distributed(self) -> bool:
        """True when a default process group exists."""
        return self.backend is not None


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a compressed SLURM node list, e.g. ``"gpu[01-03,07],login1"``.

    Zero padding of ranges is kept (``"n[008-010]"`` -> ``n008, n009, n010``).
    Only one bracket group per host name is supported, which is what SLURM emits.
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        item = item.strip()
        if not item:
            continue
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if match is None:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            if "-" in part:
                start, end = part.split("-", 1)
                width = len(start)
                for number in range(int(start), int(end) + 1):
                    hosts.append(f"{prefix}{number:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def parse_launch_environment(env: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """Read rank, world size and rendezvous address from ``env`` (default ``os.environ``).

    torchrun variables win over SLURM ones (``srun ... torchrun`` sets both).
    A SLURM step with one task counts as a single process.
    """
    env = os.environ if env is None else env
    present = [name for name in _TORCHRUN_VARS if name in env]
    if present:
        missing = [name for name in _TORCHRUN_VARS if name not in env]
        if missing:
            raise ValueError(
                f"incomplete torchrun environment: {', '.join(present)} set but "
                f"{', '.join(missing)} missing"
            )
        return LaunchEnvironment(
            kind="torchrun",
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int_var(env, "MASTER_PORT"),
        )
    if "SLURM_PROCID" in env:
        ntasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world_size = _int_var(env, ntasks_var) if ntasks_var in env else 1
        if world_size > 1:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            nodelist = nodelist or env.get("SLURM_NODELIST")
            if "MASTER_ADDR" in env:
                master_addr = env["MASTER_ADDR"]
            elif nodelist:
                master_addr = expand_slurm_nodelist(nodelist)[0]
            else:
                raise ValueError(
                    "SLURM launch with several tasks but no node list "
                    "(SLURM_JOB_NODELIST) and no MASTER_ADDR"
                )
            if "MASTER_PORT" in env:
                master_port = _int_var(env, "MASTER_PORT")
            else:
                job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
                master_port = 15000 + job_id % 20000
            return LaunchEnvironment(
                kind="slurm",
                rank=_int_var(env, "SLURM_PROCID"),
                world_size=world_size,
                local_rank=_int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                master_addr=master_addr,
                master_port=master_port,
            )
    return LaunchEnvironment(kind="single", rank=0, world_size=1, local_rank=0)


def init_distributed(
    timeout_s: float = 1800.0,
    *,
    device: str | torch.device | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedContext:
    """Create the default process group the environment asks for.

    On CUDA the backend is ``"cuda:nccl,cpu:gloo"`` (NCCL bound to this
    rank's GPU through ``device_id``, gloo for CPU objects); on CPU it is gloo.
    A single process gets no process group. An already initialised default
    group is reused (``initialized_here=False``).

    Args:
        timeout_s: collective timeout in seconds.
        device: force ``"cpu"`` or a CUDA device; default CUDA when available.
        env: environment to read (default ``os.environ``).
    """
    import torch.distributed as dist

    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    launch = parse_launch_environment(env)
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        compute_device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(compute_device)
    else:
        compute_device = torch.device("cpu")

    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=launch.local_rank,
            device=compute_device,
            backend=str(dist.get_backend()),
            launch_kind=launch.kind,
            initialized_here=False,
        )
    if launch.kind == "single":
        return DistributedContext(
            rank=0,
            world_size=1,
            local_rank=0,
            device=compute_device,
            backend=None,
            launch_kind="single",
            initialized_here=False,
        )

    backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
    kwargs = {}
    if use_cuda:
        kwargs["device_id"] = compute_device
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    return DistributedContext(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        device=compute_device,
        backend=backend,
        launch_kind=launch.kind,
        initialized_here=True,
    )


def shutdown_distributed(context: DistributedContext | None = None) -> None:
    """Destroy the default process group if :func:`init_distributed` made it.

    Without a context the default group is destroyed whenever one exists.
    Call on the success path; on failure let the process exit non-zero so the
    launcher tears the job down.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if context is not None and not context.initialized_here:
        return
    dist.destroy_process_group()
