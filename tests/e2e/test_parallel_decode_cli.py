"""``parallel.decode=parallel`` end to end: 2 torchrun ranks decode row slabs, the video is one process's."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from e2e_helpers import run_cli
from safetensors.torch import load_file

from flashdreams.runner.video import read_mp4

ARGS = [
    "wan-tiny-t2v",
    "runner.height=48",  # 6 latent rows: 3 per rank
    "runner.width=32",
    "runner.num_chunks=2",
    "runner.save_latents=true",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python"]


def test_torchrun_parallel_decode_writes_the_one_process_video(tmp_path):
    single = run_cli([*ARGS, "runner.output_dir=one"], tmp_path)
    assert single.returncode == 0, single.stderr
    for plan in ("rank0", "parallel"):
        double = run_cli(
            [*ARGS, f"runner.output_dir={plan}", f"parallel.decode={plan}"],
            tmp_path,
            prefix=TORCHRUN,
        )
        assert double.returncode == 0, double.stderr
    latents = {
        name: load_file(str(tmp_path / name / "latents.safetensors"))["latents"]
        for name in ("one", "rank0", "parallel")
    }
    assert torch.equal(latents["parallel"], latents["rank0"])
    assert (latents["parallel"] - latents["one"]).abs().max().item() < 1e-4  # CP reduction order
    videos = {name: read_mp4(tmp_path / name / "video.mp4")[0] for name in latents}
    assert videos["one"].shape == videos["parallel"].shape
    assert videos["one"].shape[1:] == (48, 32, 3) and videos["one"].std() > 1.0
    # The decode plan changes nothing in the written video...
    np.testing.assert_array_equal(videos["parallel"], videos["rank0"])
    # ...and two ranks write the one-process video up to the CP latent's rounding (which the
    # mp4 encoder can turn into a few levels on a few pixels).
    difference = np.abs(videos["parallel"].astype(int) - videos["one"].astype(int))
    assert difference.mean() < 0.05 and difference.max() <= 16, (
        difference.mean(),
        difference.max(),
    )
    stats = json.loads((tmp_path / "parallel" / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["status"] == "completed"
    assert stats["cp_layout"]["decode"] == "parallel"


def test_parallel_decode_with_overlap_is_refused(tmp_path):
    result = run_cli([*ARGS, "parallel.decode=parallel", "runner.overlap_decode=true"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert (
        "parallel.decode=parallel decodes on every rank in step with the DiT; "
        "runner.overlap_decode=true decodes on a background thread of rank 0. "
        "Choose one: drop runner.overlap_decode or use parallel.decode=rank0"
    ) in result.stderr
