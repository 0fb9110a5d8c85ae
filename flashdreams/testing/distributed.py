"""Spawn N gloo ranks on CPU and run one function on each (for tests and benchmarks).

Like torch's ``MultiProcessTestCase``, but a plain function: import it as
``from flashdreams.testing import run_on_ranks``.

``run_on_ranks(fn, world_size, *args)`` starts ``world_size`` processes with
``torch.multiprocessing`` (spawn), initialises a gloo default group on a free
localhost port, calls ``fn(rank, world_size, *args)`` and re-raises the first
failure in the parent. ``fn`` must be importable (module level).
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, num_threads):
    torch.set_num_threads(num_threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world_size,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=60),
    )
    fn(rank, world_size, *args)
    # Let every rank finish its last receives before tearing the group down.
    dist.barrier()
    dist.destroy_process_group()
    # Seen on torch 2.13 CPU: a gloo background thread occasionally aborts the
    # process during interpreter teardown ("terminate called without an active
    # exception") after all work has finished. The work is done and checked,
    # so leave without running the C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, world_size: int, *args, num_threads: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks."""
    port = find_free_port()
    mp.spawn(
        _worker,
        args=(world_size, port, fn, args, num_threads),
        nprocs=world_size,
        join=True,
    )
