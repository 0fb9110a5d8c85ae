"""flashdreams-run on the real tiny Wan pipelines, as a user runs it (CPU, random weights).

The bare command, a slug with overrides, a seeds x steps sweep, I2V, torchrun and the plugin.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata

import numpy as np
import pytest
from e2e_helpers import run_cli, run_dirs
from safetensors.torch import load_file

from flashdreams.launch.run_config import load_run_config
from flashdreams.runner.video import read_mp4


def _expected_frames(num_chunks: int, len_t: int, temporal_ratio: int = 4) -> int:
    """Causal Wan VAE: the first latent frame decodes to 1 frame, every later one to 4."""
    return 1 + temporal_ratio * (num_chunks * len_t - 1)


def test_bare_command_writes_playable_mp4(tmp_path):
    launched = time.perf_counter()
    result = run_cli([], tmp_path)
    wall_s = time.perf_counter() - launched
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path, "wan-tiny-t2v")
    config = load_run_config(run_dir / "config.yaml")
    frames, fps = read_mp4(run_dir / "video.mp4")
    len_t = config.pipeline.diffusion_model.transformer.len_t
    assert frames.shape == (
        _expected_frames(config.runner.num_chunks, len_t),
        config.runner.height,
        config.runner.width,
        3,
    )
    assert fps == pytest.approx(config.runner.fps)
    assert frames.std() > 1.0  # not a constant image
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["world_size"] == 1 and len(stats["chunks"]) == config.runner.num_chunks
    # Time to first frame, itemised: each phase once, in order, adding up.
    startup = stats["startup"]
    phases = ["launch_s", "import_s", "config_s", "distributed_s", "build_s"]
    assert [key for key in startup if key.endswith("_s")][: len(phases)] == phases
    assert all(startup[key] >= 0 for key in phases)
    assert set(startup["component_load_s"]) == {"diffusion_model", "decoder", "text_encoder"}
    assert startup["compile_s"] == 0 and startup["cuda_graph_capture_s"] == 0  # eager on CPU
    assert startup["first_chunk_s"] == stats["first_chunk_latency_s"]
    # The text encoder loads with the first rollout: inside its first chunk.
    assert startup["component_load_s"]["text_encoder"] < startup["first_chunk_s"]
    before_rollout = sum(startup[key] for key in phases)
    assert before_rollout + startup["first_chunk_s"] <= startup["time_to_first_frame_s"]
    assert startup["time_to_first_frame_s"] < before_rollout + startup["first_chunk_s"] + 1.0
    assert startup["time_to_first_frame_s"] < wall_s


def test_slug_with_overrides(tmp_path):
    result = run_cli(
        [
            "wan-tiny-t2v",
            "runner.height=32",
            "runner.width=48",
            "runner.num_chunks=3",
            "runner.prompt=a small red cube",
            "pipeline.diffusion_model.scheduler.num_inference_steps=2",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path, "wan-tiny-t2v")
    config = load_run_config(run_dir / "config.yaml")
    assert config.pipeline.diffusion_model.scheduler.num_inference_steps == 2
    assert config.runner.prompt == "a small red cube"
    len_t = config.pipeline.diffusion_model.transformer.len_t
    frames, _ = read_mp4(run_dir / "video.mp4")
    assert frames.shape == (_expected_frames(3, len_t), 32, 48, 3)


def test_sweep_of_seeds_and_steps(tmp_path):
    result = run_cli(
        [
            "wan-tiny-t2v",
            "-m",
            "runner.seed=0,1",
            "pipeline.diffusion_model.scheduler.num_inference_steps=2",
            "runner.height=32",
            "runner.width=32",
            "runner.num_chunks=1",
            "runner.save_latents=true",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    dirs = run_dirs(tmp_path, "wan-tiny-t2v")
    assert len(dirs) == 2
    seeds = sorted(load_run_config(d / "config.yaml").runner.seed for d in dirs)
    assert seeds == [0, 1]
    latents = [load_file(str(d / "latents.safetensors"))["latents"] for d in dirs]
    assert not latents[0].equal(latents[1])
    for d in dirs:
        assert read_mp4(d / "video.mp4")[0].shape == (_expected_frames(1, 2), 32, 32, 3)


def test_bad_override_on_real_slug(tmp_path):
    result = run_cli(["wan-tiny-t2v", "pipeline.diffusion_model.transformer.len=3"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "flashdreams-run: error: unknown config key 'pipeline.diffusion_model.transformer.len': "
        "Wan21TransformerConfig has no field 'len'. Valid keys at 'pipeline.diffusion_model.transformer': "
    )
    assert "len_t" in lines[0] and "window_size_t" in lines[0]


def test_i2v_with_first_frame(tmp_path):
    from PIL import Image

    image_path = tmp_path / "first.png"
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = 255
    Image.fromarray(pixels).save(image_path)
    result = run_cli(
        ["wan-tiny-i2v", f"runner.image={image_path}", "runner.height=32", "runner.width=32"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path, "wan-tiny-i2v")
    frames, _ = read_mp4(run_dir / "video.mp4")
    assert frames.shape[1:] == (32, 32, 3)


def test_torchrun_two_ranks_match_one_process(tmp_path):
    args = [
        "wan-tiny-t2v",
        "runner.height=32",
        "runner.width=32",
        "runner.num_chunks=2",
        "runner.save_latents=true",
    ]
    single = run_cli([*args, "runner.output_dir=one"], tmp_path)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python"]
    double = run_cli([*args, "runner.output_dir=two"], tmp_path, prefix=torchrun)
    assert double.returncode == 0, double.stderr
    one = load_file(str(tmp_path / "one" / "latents.safetensors"))["latents"]
    two = load_file(str(tmp_path / "two" / "latents.safetensors"))["latents"]
    assert one.shape == two.shape
    # Same weights (seeded), same global noise; only the attention reduction order differs.
    assert (one - two).abs().max().item() < 1e-4
    stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert stats["world_size"] == 2


def test_torchrun_cfg_parallel_plan_matches_batched_cfg(tmp_path):
    """``parallel.cfg_parallel=true`` reaches the model through the launcher's plan: one CFG
    branch per rank gives the latents of batched CFG on one process."""
    args = [
        "wan-tiny-t2v",
        "runner.height=32",
        "runner.width=32",
        "runner.num_chunks=2",
        "runner.save_latents=true",
        "pipeline.diffusion_model.transformer.guidance_scale=3.0",
    ]
    single = run_cli([*args, "runner.output_dir=one"], tmp_path)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python"]
    double = run_cli(
        [*args, "parallel.cfg_parallel=true", "runner.output_dir=two"], tmp_path, prefix=torchrun
    )
    assert double.returncode == 0, double.stderr
    one = load_file(str(tmp_path / "one" / "latents.safetensors"))["latents"]
    two = load_file(str(tmp_path / "two" / "latents.safetensors"))["latents"]
    assert (one - two).abs().max().item() < 1e-4
    stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert stats["cp_layout"] == {
        "world_size": 2,
        "cp_size": 1,
        "cfg_parallel": True,
        "decode": "rank0",
    }


def _plugin_installed() -> bool:
    try:
        metadata.distribution("flashdreams-self-forcing")
    except metadata.PackageNotFoundError:
        return False
    return True


def test_self_forcing_plugin_lists_and_runs(tmp_path):
    assert _plugin_installed(), "the README's install command installs recipes/self_forcing"
    listed = run_cli(["--list"], tmp_path)
    slugs = [line.split()[0] for line in listed.stdout.splitlines()]
    assert "self-forcing-1.3b" in slugs and "self-forcing-tiny" in slugs
    result = run_cli(["self-forcing-tiny", "runner.height=32", "runner.width=32"], tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path, "self-forcing-tiny")
    config = load_run_config(run_dir / "config.yaml")
    scheduler = config.pipeline.diffusion_model.scheduler
    assert list(scheduler.denoising_timesteps) == [1000, 750, 500, 250]
    assert scheduler.shift == 5.0 and config.pipeline.diffusion_model.transformer.len_t == 3
    frames, _ = read_mp4(run_dir / "video.mp4")
    assert frames.shape == (_expected_frames(2, 3), 32, 32, 3)
