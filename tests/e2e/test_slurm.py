"""Real SLURM: the single-node sbatch template and a Hydra sweep through submitit.

Skipped (with the reason) when no SLURM cluster is up; .ci/run starts a
one-node cluster on localhost (slurm/local/start-local-slurm.sh) before pytest.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from e2e_helpers import FAKE_PIPELINE_DIR, REPO_ROOT, run_cli, slurm_is_up, tiny_pipeline_args

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
