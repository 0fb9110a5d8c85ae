"""The GPU benchmark's code path (model + decoder build, AR loop, report) runs on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "bench_gpu.py"


def test_bench_gpu_smoke_runs_both_decoders_on_cpu() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| eager |")]
    assert [row.split("|")[2].strip() for row in rows] == ["wan-vae", "taehv"]
    assert "SMOKE RUN (code path only, not a measurement)" in completed.stdout


def test_bench_gpu_rejects_unknown_mode() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--modes", "eager,fast"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode != 0
    assert "unknown mode(s) ['fast']; choose from eager, compile, cudagraph" in completed.stderr
