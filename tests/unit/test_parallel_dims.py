"""ParallelDims validation, launch-environment parsing and token sharding (no process group)."""

from __future__ import annotations

import pytest
import torch

from flashdreams.core.distributed import (
    ParallelDims,
    build_cp_mesh,
    expand_slurm_nodelist,
    init_distributed,
    local_token_count,
    parse_launch_environment,
    ring_group_ranks,
    shutdown_distributed,
    split_tokens,
    token_valid_mask,
    ulysses_group_ranks,
)


def test_defaults_to_ring_over_the_world():
    dims = ParallelDims(4, num_heads=12)
    assert (dims.ulysses_degree, dims.ring_degree, dims.cp_degree, dims.method) == (1, 4, 4, "ring")


def test_derives_the_missing_degree():
    assert ParallelDims(8, ulysses_degree=4).ring_degree == 2
    assert ParallelDims(8, ring_degree=4).ulysses_degree == 2
    assert ParallelDims(8, ulysses_degree=2, ring_degree=4).method == "usp"
    assert ParallelDims(1).method == "none"


def test_ulysses_degree_must_divide_heads():
    with pytest.raises(ValueError) as info:
        ParallelDims(8, ulysses_degree=8, num_heads=12)
    assert str(info.value) == (
        "12 heads: Ulysses degree must be one of 1, 2, 3, 4, 6, 12; got 8 "
        "(with world size 8 use one of 1, 2, 4)"
    )


def test_degrees_must_multiply_to_world_size():
    with pytest.raises(ValueError, match=r"must equal the world size 8; got 2 x 2 = 4"):
        ParallelDims(8, ulysses_degree=2, ring_degree=2)
    with pytest.raises(ValueError) as info:
        ParallelDims(6, ulysses_degree=4)
    assert str(info.value) == "world size 6: ulysses_degree must be one of 1, 2, 3, 6; got 4"


def test_from_cp_method():
    assert ParallelDims.from_cp_method(8, "usp", num_heads=12).ulysses_degree == 4
    assert ParallelDims.from_cp_method(8, "ulysses", num_heads=40).ring_degree == 1
    with pytest.raises(ValueError, match="12 heads: Ulysses degree must be one of"):
        ParallelDims.from_cp_method(8, "ulysses", num_heads=12)


def test_mesh_layout_contiguous_ulysses_strided_ring():
    dims = ParallelDims(8, ulysses_degree=4, ring_degree=2)
    assert ulysses_group_ranks(dims) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ring_group_ranks(dims) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mesh = build_cp_mesh(ParallelDims(1))
    assert mesh.cp_group is None and mesh.ulysses_group is None and mesh.ring_group is None


def test_parse_torchrun_environment():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "29500",
    }
    launch = parse_launch_environment(env | {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (launch.kind, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 3, 4, 1)
    assert (launch.master_addr, launch.master_port) == ("h", 29500)
    with pytest.raises(ValueError, match="incomplete torchrun environment: RANK set but"):
        parse_launch_environment({"RANK": "0"})


def test_parse_slurm_environment():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[007-008,010],cpu1",
        "SLURM_JOB_ID": "12345",
    }
    launch = parse_launch_environment(env)
    assert (launch.kind, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 5, 8, 1)
    assert launch.master_addr == "gpu007"
    assert launch.master_port == 15000 + 12345 % 20000
    # One task (e.g. the sbatch script itself) is a single process.
    assert parse_launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).kind == "single"
    assert parse_launch_environment({}).kind == "single"
    assert expand_slurm_nodelist("a[1-3],b") == ["a1", "a2", "a3", "b"]


def test_single_process_init_creates_no_group():
    context = init_distributed(timeout_s=10, device="cpu", env={})
    assert (context.rank, context.world_size, context.backend) == (0, 1, None)
    assert not context.is_distributed and not context.initialized_here
    shutdown_distributed(context)
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        init_distributed(timeout_s=0, env={})


def test_split_pads_the_last_ranks():
    x = torch.arange(10)[None]  # [1, 10] -> 4 ranks x 3 slots
    shards = [split_tokens(x, 1, r, 4) for r in range(4)]
    assert [s.tolist() for s in shards] == [[[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8]], [[9, 0, 0]]]
    assert [local_token_count(10, r, 4) for r in range(4)] == [3, 3, 3, 1]
    assert token_valid_mask(10, 3, 4).tolist() == [True, False, False]
    # Fewer tokens than ranks: trailing ranks hold only padding.
    assert token_valid_mask(2, 3, 4).tolist() == [False]
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\), got 4"):
        split_tokens(x, 1, 4, 4)
