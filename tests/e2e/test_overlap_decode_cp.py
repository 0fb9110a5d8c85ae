"""runner.overlap_decode under context parallelism: 2 spawned gloo ranks run the real
``wan-tiny-t2v`` slug with and without overlap; rank 0 alone decodes (on its background
thread) and the video and latents are bit-identical to the sequential run.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from flashdreams.runner.video import read_mp4
from flashdreams.testing import run_on_ranks

NUM_CHUNKS = 3


def _roll_out_both_ways(rank: int, world_size: int, out_dir: str) -> None:
    from flashdreams.launch.cli import compose
    from flashdreams.launch.run_config import build_run_config
    from flashdreams.runner.runner import RunContext

    for overlap in (False, True):
        container = compose(
            "wan-tiny-t2v",
            [
                "runner.height=32",
                "runner.width=32",
                f"runner.num_chunks={NUM_CHUNKS}",
                "runner.save_latents=true",
                f"runner.overlap_decode={str(overlap).lower()}",
            ],
        )
        run_config = build_run_config(container)
        run_dir = Path(out_dir) / ("overlap" if overlap else "sequential")
        runner = run_config.runner.setup(
            pipeline_config=run_config.pipeline,
            context=RunContext(run_dir=run_dir, rank=rank, world_size=world_size),
        )
        threads_before = {thread.name for thread in threading.enumerate()}
        stats = runner.run()
        assert stats["cp_layout"]["cp_size"] == world_size
        # The worker exists on rank 0 only, and is gone once the run returns.
        assert "flashdreams-chunk-worker" not in {t.name for t in threading.enumerate()}
        assert "flashdreams-chunk-worker" not in threads_before
        if rank != 0:
            assert stats["chunks"] and all(c["num_frames"] == 0 for c in stats["chunks"])


def test_overlap_under_context_parallelism_matches_sequential(tmp_path):
    run_on_ranks(_roll_out_both_ways, 2, str(tmp_path))
    sequential, overlap = tmp_path / "sequential", tmp_path / "overlap"
    sequential_latents = load_file(str(sequential / "latents.safetensors"))["latents"]
    overlap_latents = load_file(str(overlap / "latents.safetensors"))["latents"]
    assert overlap_latents.shape == (1, 2 * NUM_CHUNKS, 16, 4, 4)
    assert torch.equal(overlap_latents, sequential_latents)
    sequential_video, _ = read_mp4(sequential / "video.mp4")
    overlap_video, _ = read_mp4(overlap / "video.mp4")
    assert overlap_video.shape == (1 + 4 * (2 * NUM_CHUNKS - 1), 32, 32, 3)
    np.testing.assert_array_equal(overlap_video, sequential_video)
    stats = json.loads((overlap / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["status"] == "completed"
    assert all(chunk["decode_s"] > 0 for chunk in stats["chunks"])
