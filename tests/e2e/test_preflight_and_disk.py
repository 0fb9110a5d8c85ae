"""Checks before any work, and a disk that fills up: through the real CLI, on the tiny slugs.

The full-disk tests mount a small tmpfs (CI runs as root); where mounting is refused
they fail with the reason rather than skip, since the check would otherwise be lost.
"""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import e2e_helpers as e2e
import pytest

from flashdreams.runner.video import read_mp4

# ---- item 3: a full disk ------------------------------------------------------------------------


@contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test (needs root): {mounted.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> None:
    """Write zeros until the filesystem is full."""
    block = b"\0" * 65536
    with open(directory / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0")
        except OSError:
            pass


def test_disk_full_mid_run_keeps_a_playable_video_and_stats(tmp_path):
    """The tmpfs fills after chunk 40: every chunk written before plays, stats.json says so."""
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = disk / "run"
        process = subprocess.Popen(
            [*e2e.cli_command(), *e2e.TINY_SMALL, "runner.num_chunks=400", f"runner.output_dir={run_dir}"],
            cwd=tmp_path, env=e2e.quiet_env(), stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        log = run_dir / "log_rank0.txt"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if log.is_file() and "chunk 40/400" in log.read_text():  # logged every 40
                break
            time.sleep(0.02)
        assert process.poll() is None, process.communicate()[1]
        _fill(disk)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 1, stderr
        assert "Traceback" not in stderr and "Logging error" not in stderr, stderr
        line = e2e.single_error_line(stderr)
        assert "no space left on device writing" in line, line
        assert str(run_dir / "video.mp4") in line and f"mounted on {disk}" in line, line
        stats = json.loads((run_dir / "stats.json").read_text())
        assert stats["status"] == "failed" and "no space left on device" in stats["error"]
        written = stats["num_chunks_written"]
        # Chunk 40 was logged before the disk filled; its fragment may still have been in
        # the encoder's pipe then, so the 40th may be the one cut off.
        assert written >= 39
        frames, _ = read_mp4(run_dir / "video.mp4")
        assert frames.shape == (e2e.tiny_frames_of(written), 32, 32, 3)


def test_disk_full_at_start_is_one_line_and_exit_1(tmp_path):
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        _fill(disk)
        result = e2e.run_flashdreams(
            [*e2e.TINY_SMALL, "runner.num_chunks=1", f"runner.output_dir={disk / 'run'}"], tmp_path
        )
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "handler" not in result.stderr, result.stderr
        line = e2e.single_error_line(result.stderr)
        assert "no space left on device writing" in line and f"mounted on {disk}" in line, line
        assert not (disk / "run").exists()


# ---- item 6: released slugs without their weights ---------------------------------------------------


def test_real_slug_without_checkpoints_stops_before_building(tmp_path):
    started = time.monotonic()
    result = e2e.run_flashdreams(["wan21-t2v-1.3b", "pipeline.decoder.checkpoint_path="], tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    line = e2e.single_error_line(result.stderr)
    for expected in (
        "'wan21-t2v-1.3b' needs local checkpoint files",
        "pipeline.diffusion_model.transformer.checkpoint_path: download "
        "diffusion_pytorch_model.safetensors from https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B",
        "pipeline.decoder.checkpoint_path is not set (expects e.g. Wan2.1_VAE.pth",
        "pipeline.text_encoder.checkpoint_path: download models_t5_umt5-xxl-enc-bf16.pth",
        "pipeline.text_encoder.tokenizer_path: 'google/umt5-xxl' is not a local folder",
        "runner.allow_random_weights=true",
    ):
        assert expected in line, (expected, line)
    assert "built pipeline" not in result.stderr  # nothing was built
    assert not (tmp_path / "outputs").exists()
    assert elapsed < 60, elapsed  # seconds (start-up included), not a 6.6 GB random build


def test_random_weights_only_when_asked_and_said(tmp_path):
    result = e2e.run_flashdreams(
        [*e2e.TINY_SMALL, "runner.num_chunks=1", "runner.output_dir=r"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (
        "random weights (runner.allow_random_weights=true) for "
        "pipeline.diffusion_model.transformer, pipeline.decoder, pipeline.text_encoder"
    ) in result.stderr
    refused = e2e.run_flashdreams([*e2e.TINY_SMALL, "runner.allow_random_weights=false"], tmp_path)
    assert refused.returncode == 2
    assert "pipeline.diffusion_model.transformer.checkpoint_path is not set" in refused.stderr


# ---- item 7: validation before work -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["wan-tiny-i2v", "runner.height=32", "runner.width=32"],
         "'wan-tiny-i2v' makes a video from a first frame: give one with runner.image="),
        ([*e2e.TINY_SMALL, "runner.image=frame.png"],
         "'wan-tiny-t2v' makes a video from text only and takes no first frame"),
        ([*e2e.TINY_SMALL, "runner.height=40"], "runner.height=40 is not a multiple of 16 (try 32 or 48)"),
        (["wan-tiny-t2v", "runner.height=160000", "runner.width=160000"],
         "runner.height x runner.width = 160000x160000 needs at least"),
    ],
)  # fmt: skip
def test_inputs_and_sizes_are_checked_before_any_weight_loads(tmp_path, args, expected):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "frame.png")
    result = e2e.run_flashdreams(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in e2e.single_error_line(result.stderr)
    assert "built pipeline" not in result.stderr and "run directory" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_sweep_is_validated_before_any_job_runs(tmp_path):
    """A bad value in the second job of a sweep stops the sweep before the first job runs."""
    result = e2e.run_flashdreams(
        [*e2e.TINY_SMALL, "-m", "runner.num_chunks=1", "runner.height=32,40"], tmp_path
    )
    assert result.returncode == 2, result.stderr
    line = e2e.single_error_line(result.stderr)
    assert "sweep job 1 (runner.height=40)" in line and "not a multiple of 16" in line, line
    assert not (tmp_path / "outputs").exists()
