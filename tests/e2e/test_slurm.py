"""Real SLURM: the single-node sbatch template and a Hydra sweep through submitit.

Skipped (with the reason) when no SLURM cluster is up; .ci/run starts a
one-node cluster on localhost (slurm/local/start-local-slurm.sh) before pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from e2e_helpers import (
    FAKE_PIPELINE_DIR,
    REPO_ROOT,
    cli_command,
    run_cli,
    slurm_is_up,
    tiny_pipeline_args,
)

from flashdreams.runner.video import read_mp4

_up, _reason = slurm_is_up()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(not _up, reason=_reason)]

SIZE = ["runner.height=32", "runner.width=32", "runner.num_chunks=2"]


def _env(fake: bool) -> dict[str, str]:
    env = dict(os.environ)
    if fake:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(FAKE_PIPELINE_DIR), env.get("PYTHONPATH", "")) if p
        )
        env["FLASHDREAMS_CONF_PATH"] = str(FAKE_PIPELINE_DIR / "conf")
    return env


def test_single_node_sbatch_two_tasks(tmp_path):
    pipeline_args, fake = tiny_pipeline_args()
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--parsable",
            "--ntasks-per-node=2",
            f"--chdir={tmp_path}",
            f"--output={tmp_path}/slurm-%j.out",
            str(REPO_ROOT / "slurm" / "single_node.sbatch"),
            *pipeline_args,
            *SIZE,
            f"runner.output_dir={run_dir}",
        ],
        env=_env(fake),
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert result.returncode == 0, result.stderr + logs
    frames, _ = read_mp4(run_dir / "video.mp4")
    assert frames.shape[0] > 0 and frames.shape[1:] == (32, 32, 3)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["world_size"] == 2
    assert (run_dir / "log_rank1.txt").is_file()


def test_hydra_sweep_through_submitit(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher not installed (pip install -e '.[slurm]')",
    )
    pipeline_args, fake = tiny_pipeline_args()
    result = run_cli(
        [
            *pipeline_args,
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=5",
            f"hydra.sweep.dir={tmp_path}/sweep",
            "runner.seed=0,1",
            *SIZE,
            "runner.save_latents=true",
        ],
        tmp_path,
        fake_pipeline=fake,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    slug = "fake-tiny" if fake else pipeline_args[0]
    dirs = sorted((tmp_path / "outputs" / slug).iterdir())
    assert [d.name.rsplit("_", 1)[-1] for d in dirs] == ["job0", "job1"]
    for run_dir in dirs:
        stats = json.loads((run_dir / "stats.json").read_text())
        assert stats["world_size"] == 2
        assert read_mp4(run_dir / "video.mp4")[0].shape[1:] == (32, 32, 3)


def test_slurm_sweep_job_failing_on_rank_1_names_rank_1_in_one_line(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher not installed (pip install -e '.[slurm]')",
    )
    env = dict(_env(False), OMP_NUM_THREADS="1")
    env.pop("FLASHDREAMS_TRACEBACK", None)
    env["FLASHDREAMS_FAULT_INJECTION"] = "rank=1,step=2,stage=generate"  # only 3 chunks reach it
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            *cli_command(), "wan-tiny-t2v", "-m", "hydra/launcher=submitit_slurm",
            "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=5",
            f"hydra.sweep.dir={sweep}", "runner.height=32", "runner.width=32",
            "runner.num_chunks=2,3",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    job_id = re.search(r"sweep job 1 \(runner.num_chunks=3\) submitted as submitit job (\S+);", result.stderr).group(1)  # fmt: skip
    assert result.stderr.splitlines()[-1] == (
        f"flashdreams-run: error: sweep job 1 (runner.num_chunks=3, submitit job {job_id}) "
        "failed: [rank 1] rank 1 failed at AR step 2 (generate): InjectedFault: injected fault "
        "on rank 1 at AR step 2 (generate) (set FLASHDREAMS_TRACEBACK=1 for the traceback); "
        f"full log: {sweep / '.submitit' / job_id / f'{job_id}_1_log.err'}"
    )
    assert "sweep job 0 (runner.num_chunks=2) ok after" in result.stderr
    assert "Traceback" not in result.stderr
