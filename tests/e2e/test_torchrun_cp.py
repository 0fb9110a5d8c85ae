"""``torchrun --standalone --nproc-per-node=2`` on CPU reproduces the one-process rollout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "_cp_rollout_script.py"


def _run(command: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("cp_method", ["ring", "ulysses"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, cp_method):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _run([sys.executable, str(SCRIPT), str(one), cp_method], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run([*torchrun, "--nproc-per-node=2", str(SCRIPT), str(two), cp_method], tmp_path)
    single, parallel = load_file(str(one)), load_file(str(two))
    assert int(single["world_size"]) == 1 and int(single["cp_degree"]) == 0
    assert int(parallel["world_size"]) == 2 and int(parallel["cp_degree"]) == 2
    assert parallel["latents"].shape == single["latents"].shape == (2, 1, 2, 16, 2, 10)
    err = (parallel["latents"] - single["latents"]).abs().max().item()
    assert err <= 1e-5, f"{cp_method}: torchrun CP=2 vs one process max abs {err:.3e}"
