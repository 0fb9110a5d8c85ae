"""flashdreams-run machinery against a test-only stand-in pipeline (tests/e2e/fake_pipeline)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from e2e_helpers import FAKE_PIPELINE_DIR, run_cli, run_dirs
from safetensors.torch import load_file

from flashdreams.launch.run_config import load_run_config, run_config_to_container
from flashdreams.runner.video import read_mp4

SMALL = ["runner.height=32", "runner.width=48", "runner.num_chunks=2"]


def test_run_writes_video_config_stats(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_PIPELINE_DIR))
    result = run_cli(
        ["pipeline=fake-tiny", *SMALL, "runner.save_latents=true", "runner.fps=8"],
        tmp_path,
        fake_pipeline=True,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path, "fake-tiny")
    frames, fps = read_mp4(run_dir / "video.mp4")
    assert frames.shape == (2 * 3, 32, 48, 3)  # 2 chunks x 3 frames, H x W x RGB
    assert fps == pytest.approx(8.0)
    latents = load_file(str(run_dir / "latents.safetensors"))["latents"]
    assert tuple(latents.shape) == (1, 6, 4, 4, 6)  # [B, T, C, H/8, W/8]
    stats = __import__("json").loads((run_dir / "stats.json").read_text())
    assert stats["world_size"] == 1 and len(stats["chunks"]) == 2
    assert stats["first_chunk_latency_s"] > 0 and stats["steady_fps"] > 0
    assert (run_dir / "log_rank0.txt").read_text().count("chunk 2/2") == 1
    reloaded = load_run_config(run_dir / "config.yaml")
    assert reloaded.runner.height == 32 and reloaded.runner.save_latents is True
    saved = __import__("yaml").safe_load((run_dir / "config.yaml").read_text())
    assert run_config_to_container(reloaded) == saved


def test_nested_override_reaches_dataclass(tmp_path):
    result = run_cli(
        [
            "pipeline=fake-tiny",
            "pipeline.diffusion_model.scheduler.num_inference_steps=7",
            "--cfg",
            "job",
        ],
        tmp_path,
        fake_pipeline=True,
    )
    assert result.returncode == 0, result.stderr
    assert "num_inference_steps: 7" in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_bad_override_is_one_paragraph_error(tmp_path):
    result = run_cli(
        ["pipeline=fake-tiny", "pipeline.diffusion_model.scheduler.num_inference_step=8"],
        tmp_path,
        fake_pipeline=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "flashdreams-run: error: unknown config key "
        "'pipeline.diffusion_model.scheduler.num_inference_step': FakeSchedulerConfig has no "
        "field 'num_inference_step'. Valid keys at 'pipeline.diffusion_model.scheduler': "
        "num_inference_steps, shift"
    )
    assert "Traceback" not in result.stderr


def test_bad_value_type_is_rejected(tmp_path):
    result = run_cli(["pipeline=fake-tiny", "runner.num_chunks=two"], tmp_path, fake_pipeline=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "flashdreams-run: error: runner.num_chunks: expected an integer, got 'two'"
    )


def test_sweep_runs_two_jobs(tmp_path):
    result = run_cli(
        ["pipeline=fake-tiny", "-m", "runner.seed=0,1", *SMALL, "runner.save_latents=true"],
        tmp_path,
        fake_pipeline=True,
    )
    assert result.returncode == 0, result.stderr
    dirs = run_dirs(tmp_path, "fake-tiny")
    assert [d.name.rsplit("_", 1)[-1] for d in dirs] == ["job0", "job1"]
    latents = [load_file(str(d / "latents.safetensors"))["latents"] for d in dirs]
    assert not latents[0].equal(latents[1])  # different seeds
    for d in dirs:
        assert read_mp4(d / "video.mp4")[0].shape[0] == 6


def test_torchrun_two_ranks_match_one_process(tmp_path):
    args = ["pipeline=fake-tiny", *SMALL, "runner.save_latents=true"]
    single = run_cli([*args, "runner.output_dir=one"], tmp_path, fake_pipeline=True)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python"]
    double = run_cli(
        [*args, "runner.output_dir=two"], tmp_path, fake_pipeline=True, prefix=torchrun
    )
    assert double.returncode == 0, double.stderr
    one = load_file(str(tmp_path / "one" / "latents.safetensors"))["latents"]
    two = load_file(str(tmp_path / "two" / "latents.safetensors"))["latents"]
    assert one.equal(two)
    stats = __import__("json").loads((tmp_path / "two" / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["cp_layout"]["cp_size"] == 2
    assert (tmp_path / "two" / "log_rank1.txt").is_file()


def test_list_shows_every_builtin_slug(tmp_path):
    result = run_cli(["--list"], tmp_path)
    assert result.returncode == 0, result.stderr
    slugs = [line.split()[0] for line in result.stdout.splitlines()]
    for slug in (
        "wan21-t2v-1.3b",
        "wan21-t2v-14b",
        "wan21-i2v-14b-480p",
        "wan22-ti2v-5b",
        "wan22-t2v-a14b",
        "wan-tiny-t2v",
        "wan-tiny-i2v",
    ):
        assert slug in slugs
    assert all(len(line.split(maxsplit=1)) == 2 for line in result.stdout.splitlines())


def test_unknown_slug(tmp_path):
    result = run_cli(["wan99-nope"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("flashdreams-run: error: unknown pipeline slug 'wan99-nope'.")
    assert "wan-tiny-t2v" in result.stderr


def test_help_is_fast_and_imports_nothing_heavy(tmp_path):
    code = (
        "import sys; from flashdreams.launch.cli import main; main(['--help']);"
        "heavy = [m for m in ('torch', 'hydra', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "runner.num_chunks" in result.stdout
    assert elapsed < 1.0, f"--help took {elapsed:.2f} s"


def test_prompt_list_and_prompts_file(tmp_path):
    result = run_cli(
        ["pipeline=fake-tiny", *SMALL, "runner.prompt=[a cat,a dog]", "runner.output_dir=list"],
        tmp_path,
        fake_pipeline=True,
    )
    assert result.returncode == 0, result.stderr
    videos = sorted(p.name for p in (tmp_path / "list").glob("*.mp4"))
    assert videos == ["video_000.mp4", "video_001.mp4"]
    stats = __import__("json").loads((tmp_path / "list" / "stats.json").read_text())
    assert [r["prompt"] for r in stats["rollouts"]] == ["a cat", "a dog"]

    (tmp_path / "prompts.txt").write_text("first prompt\n\nsecond prompt\n")
    missing = run_cli(
        ["pipeline=fake-tiny", "runner.prompts_file=nope.txt"], tmp_path, fake_pipeline=True
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == "flashdreams-run: error: runner.prompts_file: no such file 'nope.txt'"
    )
    from_file = run_cli(
        ["pipeline=fake-tiny", *SMALL, "runner.prompts_file=prompts.txt", "runner.output_dir=file"],
        tmp_path,
        fake_pipeline=True,
    )
    assert from_file.returncode == 0, from_file.stderr
    stats = __import__("json").loads((tmp_path / "file" / "stats.json").read_text())
    assert [r["prompt"] for r in stats["rollouts"]] == ["first prompt", "second prompt"]
