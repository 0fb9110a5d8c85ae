"""Hydra sweeps through submitit (local processes): progress lines, one line per failed job.

A failure at run time in one job is injected with the test-only
``FLASHDREAMS_FAULT_INJECTION`` variable: the fault sits at AR step 2, which only the
job with ``runner.num_chunks=3`` reaches; the 2-chunk job completes.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from e2e_helpers import TINY_SMALL, cli_command, quiet_env, tiny_frames_of

from flashdreams.runner.video import read_mp4

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher",
    reason="hydra-submitit-launcher not installed (pip install -e '.[slurm]')",
)

SUBMITTED = re.compile(
    r"flashdreams-run: sweep job (\d) \((.*)\) submitted as submitit job (\d+); "
    r"log folder (.+)"
)


def _sweep(tmp_path, launcher: str, *overrides: str, env_extra=None):
    env = quiet_env()
    env.update(env_extra or {})
    return subprocess.run(
        [
            *cli_command(), *TINY_SMALL, "-m", f"hydra/launcher={launcher}",
            "hydra.launcher.progress_interval_s=1", f"hydra.sweep.dir={tmp_path}/sweep",
            *overrides,
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def _job_ids(stderr: str) -> dict[int, str]:
    """Sweep job number -> submitit job id, from the 'submitted' lines."""
    found = {
        int(m.group(1)): m.group(3) for m in map(SUBMITTED.fullmatch, stderr.splitlines()) if m
    }
    assert len(found) == 2, stderr
    return found


def test_a_job_failing_at_run_time_ends_the_sweep_with_one_line_and_exit_1(tmp_path):
    result = _sweep(
        tmp_path, "submitit_local", "runner.num_chunks=2,3",
        env_extra={"FLASHDREAMS_FAULT_INJECTION": "rank=0,step=2,stage=generate"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    stderr = result.stderr
    ids = _job_ids(stderr)
    sweep = tmp_path / "sweep" / ".submitit"
    lines = stderr.splitlines()
    assert lines[:2] == [
        f"flashdreams-run: sweep job {n} (runner.num_chunks={n + 2}) submitted as submitit "
        f"job {ids[n]}; log folder {sweep / ids[n]}"
        for n in (0, 1)
    ]
    assert any(re.fullmatch(r"flashdreams-run: sweep: 0 of 2 jobs done \(0 failed\), \d+ s elapsed", line) for line in lines), stderr  # fmt: skip
    assert re.search(r"^flashdreams-run: sweep job 0 \(runner.num_chunks=2\) ok after [\d.]+ s$", stderr, re.M)  # fmt: skip
    assert re.search(r"^flashdreams-run: sweep job 1 \(runner.num_chunks=3\) failed after [\d.]+ s$", stderr, re.M)  # fmt: skip
    assert re.fullmatch(r"flashdreams-run: sweep: 2 of 2 jobs done \(1 failed\) in [\d.]+ s", lines[-2])  # fmt: skip
    assert lines[-1] == (
        f"flashdreams-run: error: sweep job 1 (runner.num_chunks=3, submitit job {ids[1]}) "
        "failed: rank 0 failed at AR step 2 (generate): InjectedFault: injected fault on rank 0 "
        "at AR step 2 (generate) (set FLASHDREAMS_TRACEBACK=1 for the traceback); "
        f"full log: {sweep / ids[1] / f'{ids[1]}_0_log.err'}"
    )
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert "Traceback" not in stderr and "UncompletedJobError" not in stderr
    # Every line is ours: nothing from Hydra or submitit.
    assert all(line.startswith("flashdreams-run: ") for line in lines), stderr
    # The job that finished keeps its outputs; the failed one keeps its 2 chunks.
    run_dirs = sorted((tmp_path / "outputs" / "wan-tiny-t2v").iterdir())
    assert [d.name.rsplit("_", 1)[-1] for d in run_dirs] == ["job0", "job1"]
    finished, failed = (json.loads((d / "stats.json").read_text()) for d in run_dirs)
    assert finished["status"] == "completed"
    assert read_mp4(run_dirs[0] / "video.mp4")[0].shape[0] == tiny_frames_of(2)
    assert failed["status"] == "failed" and failed["num_chunks_written"] == 2


def test_a_sweep_whose_jobs_all_succeed_exits_0_with_progress(tmp_path):
    result = _sweep(tmp_path, "submitit-local", "runner.seed=0,1", "runner.num_chunks=1")
    assert result.returncode == 0, result.stderr
    ids = _job_ids(result.stderr)
    for number in (0, 1):
        assert re.search(
            rf"^flashdreams-run: sweep job {number} \(runner.seed={number}\) ok after [\d.]+ s$",
            result.stderr,
            re.M,
        ), result.stderr
    assert re.search(r"^flashdreams-run: sweep: 2 of 2 jobs done \(0 failed\) in ", result.stderr, re.M)  # fmt: skip
    assert "error" not in result.stderr
    for run_dir in sorted((tmp_path / "outputs" / "wan-tiny-t2v").iterdir()):
        assert json.loads((run_dir / "stats.json").read_text())["status"] == "completed"
    assert len(ids) == 2
