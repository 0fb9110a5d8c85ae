"""``parallel.decode=dedicated`` end to end: the last torchrun rank decodes, the video is the
``rank0`` plan's bit for bit, and a stop signal on the decode rank stops the whole job."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from e2e_helpers import launch_ranks, quiet_env, run_cli
from safetensors.torch import load_file

from flashdreams.runner.video import read_mp4

ARGS = [
    "wan-tiny-t2v",
    "runner.height=48",
    "runner.width=32",
    "runner.num_chunks=3",
    "runner.save_latents=true",
]
FRAMES_OF_TWO_CHUNKS = 13  # 5 + 8


def torchrun(num_ranks: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={num_ranks}",
        "--no-python",
    ]


def _outputs(run_dir):
    latents = load_file(str(run_dir / "latents.safetensors"))["latents"]
    return latents, read_mp4(run_dir / "video.mp4")[0]


CFG_PARALLEL = [
    "pipeline.diffusion_model.transformer.guidance_scale=3.0",
    "parallel.cfg_parallel=true",
]


@pytest.mark.parametrize(
    ("overrides", "cp_size"), [([], 2), (CFG_PARALLEL, 1)], ids=["cp", "cfg_parallel"]
)
def test_dedicated_decode_rank_writes_the_rank0_video(tmp_path, overrides, cp_size):
    """3 ranks = 2 DiT ranks + 1 decode rank vs 2 ranks with rank 0 decoding: the same video,
    bit for bit. The DiT ranks run context parallel, or one CFG branch each."""
    for name, num_ranks, plan in (("rank0", 2, "rank0"), ("dedicated", 3, "dedicated")):
        result = run_cli(
            [*ARGS, *overrides, f"runner.output_dir={name}", f"parallel.decode={plan}"],
            tmp_path,
            prefix=torchrun(num_ranks),
        )
        assert result.returncode == 0, result.stderr
    latents, video = _outputs(tmp_path / "rank0")
    dedicated_latents, dedicated_video = _outputs(tmp_path / "dedicated")
    assert torch.equal(dedicated_latents, latents)
    assert video.shape == (21, 48, 32, 3) and video.std() > 1.0
    np.testing.assert_array_equal(dedicated_video, video)
    stats = json.loads((tmp_path / "dedicated" / "stats.json").read_text())
    assert stats["status"] == "completed"
    assert stats["cp_layout"] == {
        "world_size": 3,
        "cp_size": cp_size,
        "cfg_parallel": bool(overrides),
        "decode": "dedicated",
        "dit_ranks": 2,
        "decode_rank": 2,
    }
    assert [chunk["num_frames"] for chunk in stats["chunks"]] == [5, 8, 8]
    assert all(chunk["decode_s"] > 0 for chunk in stats["chunks"])


def test_two_ranks_dedicated_equal_one_process_and_stop_together(tmp_path, monkeypatch):
    """2 ranks (1 DiT rank + 1 decode rank) write one process's video; SIGTERM on the decode
    rank stops both ranks at a common point, keeping whole chunks in order."""
    single = run_cli([*ARGS, "runner.output_dir=one"], tmp_path)
    assert single.returncode == 0, single.stderr
    dedicated = run_cli(
        [*ARGS, "runner.output_dir=dedicated", "parallel.decode=dedicated"],
        tmp_path,
        prefix=torchrun(2),
    )
    assert dedicated.returncode == 0, dedicated.stderr
    latents, video = _outputs(tmp_path / "one")
    dedicated_latents, dedicated_video = _outputs(tmp_path / "dedicated")
    assert torch.equal(dedicated_latents, latents)
    np.testing.assert_array_equal(dedicated_video, video)

    monkeypatch.setenv("FLASHDREAMS_FAULT_INJECTION", "rank=1,step=0,stage=write,kind=sigterm")
    stopped = run_cli(
        [*ARGS, "runner.output_dir=stopped", "parallel.decode=dedicated"],
        tmp_path,
        prefix=torchrun(2),
    )
    assert stopped.returncode != 0
    # The decode rank's signal reaches rank 0 with chunk 0's frames: the DiT rank stops at
    # its next stop check, after chunk 1 was handed over; chunk 1 is still decoded and kept.
    assert "[rank 0] interrupted by SIGTERM after AR step 1 was written" in stopped.stderr
    # The decode rank writes nothing: its line points at rank 0's, never "nothing was kept".
    assert (
        "[rank 1] interrupted by SIGTERM after decoding 2 chunk(s) of prompt 0; rank 0 writes "
        "the output (its line says what was kept)" in stopped.stderr
    ), stopped.stderr
    assert "nothing was kept" not in stopped.stderr
    stats = json.loads((tmp_path / "stopped" / "stats.json").read_text())
    assert stats["status"] == "interrupted" and stats["num_chunks_written"] == 2
    kept = read_mp4(tmp_path / "stopped" / "video.mp4")[0]
    np.testing.assert_array_equal(kept, video[:FRAMES_OF_TWO_CHUNKS])


def _final_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("flashdreams-run:")]


def test_three_ranks_sigterm_on_a_dit_rank_every_line_true(tmp_path):
    """SIGTERM on DiT rank 1 (of 2 DiT ranks + the decode rank, no launcher to tear them
    down): every rank stops with the signal's code and a true line; rank 0 keeps 2 chunks."""
    env = dict(quiet_env(), FLASHDREAMS_FAULT_INJECTION="rank=1,step=2,stage=generate,kind=sigterm")
    args = [*ARGS, "runner.num_chunks=4", "parallel.decode=dedicated", "runner.output_dir=run"]
    outcomes = launch_ranks(args, tmp_path, 3, env)
    where = "before denoising step 0 of AR step 2; that chunk was dropped"
    rank0_writes = "rank 0 writes the output (its line says what was kept)"
    expected = [
        f"flashdreams-run: [rank 0] interrupted by SIGTERM {where}; 2 chunk(s) kept in a "
        "playable video; stats.json says status: interrupted",
        f"flashdreams-run: [rank 1] interrupted by SIGTERM {where}; {rank0_writes}",
        "flashdreams-run: [rank 2] interrupted by SIGTERM after decoding 2 chunk(s) of prompt 0; "
        f"{rank0_writes}",
    ]
    for rank, (code, stderr, _) in enumerate(outcomes):
        assert code == 143 and _final_lines(stderr) == [expected[rank]], (rank, code, stderr)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["status"] == "interrupted" and stats["num_chunks_written"] == 2
    assert read_mp4(tmp_path / "run" / "video.mp4")[0].shape[0] == FRAMES_OF_TWO_CHUNKS


def test_three_ranks_a_dit_rank_fails_every_rank_stops_promptly(tmp_path):
    """Rank 1 (a DiT rank) fails: the decode rank and rank 0 name it and exit within a few
    seconds of its exit (measured: 0.5-0.8 s on a loaded 2-core box; no launcher helps)."""
    env = dict(quiet_env(), FLASHDREAMS_FAULT_INJECTION="rank=1,step=2,stage=generate")
    args = [*ARGS, "runner.num_chunks=4", "parallel.decode=dedicated", "runner.output_dir=run"]
    outcomes = launch_ranks(args, tmp_path, 3, env)
    failure = "rank 1 failed at AR step 2 (generate): InjectedFault"
    for rank, (code, stderr, _) in enumerate(outcomes):
        lines = _final_lines(stderr)
        assert code == 1 and len(lines) == 1, (rank, code, stderr)
        assert failure in lines[0] and "nothing was kept" not in lines[0], (rank, stderr)
    exit_times = [seconds for _, _, seconds in outcomes]
    assert max(exit_times) - exit_times[1] < 6.0, exit_times
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    # Chunk 1 was with the decode rank, which stops on the notice too: chunk 0 is kept.
    assert stats["status"] == "failed" and stats["num_chunks_written"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [],
            "parallel.decode=dedicated needs at least 2 ranks (the last rank decodes while the "
            "others run the DiT); this job has 1. Use parallel.decode=rank0, or start 2 or "
            "more ranks (torchrun --nproc_per_node=2)",
        ),
        (
            ["runner.overlap_decode=true"],
            "parallel.decode=dedicated already decodes chunk i on its own rank while the DiT "
            "ranks run chunk i+1 (what runner.overlap_decode=true does on a background thread "
            "of rank 0). Choose one: drop runner.overlap_decode or use parallel.decode=rank0",
        ),
    ],
)
def test_dedicated_decode_refusals(tmp_path, overrides, message):
    result = run_cli([*ARGS, "parallel.decode=dedicated", *overrides], tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "outputs").exists()
