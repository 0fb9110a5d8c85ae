"""Run-time faults on the real tiny Wan slug: a rank dies, SIGTERM, non-finite output.

Faults are injected with the test-only ``FLASHDREAMS_FAULT_INJECTION`` variable
(``flashdreams.runner.safety.FaultInjection``, read in one place).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e_helpers import cli_command, launch_ranks

from flashdreams.runner.video import read_mp4

SMALL = ["wan-tiny-t2v", "runner.height=32", "runner.width=32"]
LEN_T = 2  # latent frames per chunk of wan-tiny-t2v


def _frames_of(num_chunks: int) -> int:
    """Causal Wan VAE: 1 frame for the first latent frame, 4 for every later one."""
    return 1 + 4 * (num_chunks * LEN_T - 1)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("FLASHDREAMS_TRACEBACK", None)
    return env


def _stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "stats.json").read_text())


def test_rank1_dies_under_torchrun(tmp_path):
    """Rank 1 raises at AR step 2: every process ends non-zero within 60 s, the error names rank 1."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    started = time.monotonic()
    result = subprocess.run(
        [*torchrun, "--no-python", "flashdreams-run", *SMALL, "runner.num_chunks=5",
         "runner.output_dir=run"],
        cwd=tmp_path,
        env=_env(FLASHDREAMS_FAULT_INJECTION="rank=1,step=2,stage=generate"),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode != 0 and elapsed < 60, (elapsed, result.stderr)
    assert (
        "flashdreams-run: error: [rank 1] rank 1 failed at AR step 2 (generate): InjectedFault"
        in result.stderr
    ), result.stderr
    stats = _stats(tmp_path / "run")
    assert stats["status"] in ("failed", "interrupted")  # torchrun may SIGTERM rank 0 first
    assert stats["last_completed_chunk"] == 1 and stats["num_chunks_written"] == 2
    assert read_mp4(tmp_path / "run" / "video.mp4")[0].shape[0] == _frames_of(2)


def _launch_two_ranks(tmp_path: Path, fault: str, num_chunks: int) -> list[tuple[int, str, float]]:
    """Two ranks started like ``srun`` would (no torchrun agent to kill the survivors)."""
    args = [*SMALL, f"runner.num_chunks={num_chunks}", "runner.output_dir=run"]
    return launch_ranks(args, tmp_path, 2, _env(FLASHDREAMS_FAULT_INJECTION=fault))


def test_rank0_fails_during_write_and_rank1_learns_it(tmp_path):
    """Rank 0 fails writing chunk 1; rank 1 learns it from the failure notice, not a barrier."""
    outcomes = _launch_two_ranks(tmp_path, "rank=0,step=1,stage=write", num_chunks=4)
    for rank, (code, stderr, elapsed) in enumerate(outcomes):
        assert code == 1 and elapsed < 60, (rank, code, elapsed, stderr)
    assert "[rank 0] rank 0 failed at AR step 1 (write): InjectedFault" in outcomes[0][1]
    assert (
        "[rank 1] stopping because rank 0 failed at AR step 1 (write): InjectedFault"
        in outcomes[1][1]
    ), outcomes[1][1]
    stats = _stats(tmp_path / "run")
    assert stats["status"] == "failed" and stats["last_completed_chunk"] == 0
    assert read_mp4(tmp_path / "run" / "video.mp4")[0].shape[0] == _frames_of(1)


def test_rank1_dies_without_launcher_help(tmp_path):
    """Same as under torchrun, but nobody kills rank 0 for us: it must stop by itself."""
    outcomes = _launch_two_ranks(tmp_path, "rank=1,step=2,stage=generate", num_chunks=5)
    for rank, (code, stderr, elapsed) in enumerate(outcomes):
        assert code == 1 and elapsed < 60, (rank, code, elapsed, stderr)
    assert "[rank 0] stopping because rank 1 failed at AR step 2 (generate)" in outcomes[0][1]
    stats = _stats(tmp_path / "run")
    assert stats["status"] == "failed" and stats["last_completed_chunk"] == 1
    assert "rank 1 failed at AR step 2" in stats["error"]


def test_sigterm_keeps_a_playable_video(tmp_path):
    """SIGTERM mid-rollout: playable mp4 of the chunks written, stats.json says interrupted."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [*cli_command(), *SMALL, "runner.num_chunks=300", "runner.output_dir=run"],
        cwd=tmp_path,
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run_dir / "log_rank0.txt"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and "chunk 60/300" in log.read_text():  # logged every 30 chunks
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    stats = _stats(run_dir)
    assert stats["status"] == "interrupted"
    written = stats["num_chunks_written"]
    assert 60 <= written < 300
    assert stats["last_completed_chunk"] in (written - 1, written - 2)
    frames, _ = read_mp4(run_dir / "video.mp4")
    assert frames.shape == (_frames_of(written), 32, 32, 3)


def test_non_finite_latent_names_the_step(tmp_path):
    fault = _env(FLASHDREAMS_FAULT_INJECTION="rank=0,step=1,stage=generate,kind=nan")
    args = [*cli_command(), *SMALL, "runner.num_chunks=3"]
    checked = subprocess.run(
        [*args, "runner.output_dir=checked"],
        cwd=tmp_path,
        env=fault,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1
    assert (
        "flashdreams-run: error: rank 0 failed at AR step 1 (generate): NonFiniteOutputError: "
        "AR step 1: the generated latent holds 512 NaN/Inf value(s) out of 512"
    ) in checked.stderr
    stats = _stats(tmp_path / "checked")
    assert stats["status"] == "failed" and stats["num_chunks_written"] == 1
    assert read_mp4(tmp_path / "checked" / "video.mp4")[0].shape[0] == _frames_of(1)

    unchecked = subprocess.run(
        [*args, "runner.output_dir=unchecked", "runner.check_finite=false"],
        cwd=tmp_path,
        env=fault,
        capture_output=True,
        text=True,
    )
    assert unchecked.returncode == 0, unchecked.stderr
    assert _stats(tmp_path / "unchecked")["status"] == "completed"
