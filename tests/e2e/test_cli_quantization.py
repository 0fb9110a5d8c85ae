"""flashdreams-run with the low-precision tier switched on (tiny Wan pipeline, CPU)."""

from __future__ import annotations

import pytest
import torch
from e2e_helpers import run_cli, run_dirs

from flashdreams.launch.run_config import load_run_config
from flashdreams.runner.video import read_mp4


def test_int8_weight_only_rollout_through_the_cli(tmp_path):
    result = run_cli(
        ["wan-tiny-t2v", "pipeline.diffusion_model.transformer.quantization=int8_weight_only"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "quantization=int8_weight_only: network weights" in result.stderr
    (run_dir,) = run_dirs(tmp_path, "wan-tiny-t2v")
    config = load_run_config(run_dir / "config.yaml")
    assert config.pipeline.diffusion_model.transformer.quantization == "int8_weight_only"
    frames, _ = read_mp4(run_dir / "video.mp4")
    assert frames.shape[0] > 1 and frames.std() > 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_fp8_without_hardware_stops_with_one_line(tmp_path):
    result = run_cli(
        ["wan-tiny-t2v", "pipeline.diffusion_model.transformer.quantization=fp8"], tmp_path
    )
    assert result.returncode != 0
    assert "quantization=fp8 cannot run here" in result.stderr
    assert "Traceback" not in result.stderr
