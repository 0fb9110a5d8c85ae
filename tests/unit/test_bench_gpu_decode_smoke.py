"""``bench/gpu/bench_gpu_decode.py --smoke`` runs its one-vs-N decode comparison on CPU ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "bench_gpu_decode.py"


def test_gpu_decode_bench_smoke_prints_the_comparison():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "| decode ms per chunk |" in result.stdout
    assert "| 1 rank | 2 | ratio |" in result.stdout
