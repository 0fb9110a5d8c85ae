"""Nothing lost, nothing silent: output directories, Ctrl-C, stop requests, prompts as typed.

Every test runs ``flashdreams-run`` on the tiny Wan slug as a subprocess, the way a user
does, at 32x32 pixels (docs/errors.md lists the messages checked here).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml
from e2e_helpers import (
    TINY_SMALL,
    cli_command,
    quiet_env,
    run_flashdreams,
    single_error_line,
    tiny_frames_of,
)

from flashdreams.runner.video import read_mp4


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def _stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "stats.json").read_text())


# ---- item 1: a failing run deletes only what it created ------------------------------------


def test_failing_run_leaves_the_users_files_alone(tmp_path):
    """A user's ``config.yaml`` is refused, never deleted; a run that fails in a directory
    holding other files removes its own files only."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.yaml").write_text("x\n")
    result = run_flashdreams([*TINY_SMALL, "runner.output_dir=taken", "runner.height=40"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert (taken / "config.yaml").read_text() == "x\n"
    assert sorted(p.name for p in taken.iterdir()) == ["config.yaml"]

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("mine\n")
    missing = "pipeline.diffusion_model.transformer.checkpoint_path=missing.safetensors"
    result = run_flashdreams([*TINY_SMALL, "runner.output_dir=shared", missing], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "missing.safetensors" in single_error_line(result.stderr)
    assert sorted(p.name for p in shared.iterdir()) == ["notes.txt"]
    assert (shared / "notes.txt").read_text() == "mine\n"

    result = run_flashdreams(
        [*TINY_SMALL, "runner.output_dir=fresh/run", "runner.height=40"], tmp_path
    )
    assert result.returncode == 2 and not (tmp_path / "fresh").exists(), result.stderr


# ---- item 2: a used directory is refused, a written one is locked -------------------------------


def test_second_run_into_a_used_directory_refuses(tmp_path):
    first = run_flashdreams([*TINY_SMALL, "runner.num_chunks=1", "runner.output_dir=d", "runner.save_latents=true"],
                 tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = _digests(tmp_path / "d")
    assert {"config.yaml", "stats.json", "video.mp4", "latents.safetensors"} <= set(before)

    second = run_flashdreams(
        [*TINY_SMALL, "runner.num_chunks=1", "runner.output_dir=d", "runner.seed=5"], tmp_path
    )
    assert second.returncode == 2, second.stderr
    assert single_error_line(second.stderr) == (
        "flashdreams-run: error: runner.output_dir 'd' already holds a run (config.yaml, "
        "latents.safetensors, log_rank0.txt, stats.json, video.mp4); choose a new directory, "
        "or set runner.overwrite=true to replace those files"
    )
    assert _digests(tmp_path / "d") == before  # byte-identical, nothing added

    third = run_flashdreams([*TINY_SMALL, "runner.num_chunks=1", "runner.output_dir=d", "runner.seed=5",
                  "runner.overwrite=true"], tmp_path)  # fmt: skip
    assert third.returncode == 0, third.stderr
    assert "deleted the earlier run's" in third.stderr
    assert not (tmp_path / "d" / "latents.safetensors").exists()  # nothing stale left
    assert yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())["runner"]["seed"] == 5
    assert not (tmp_path / "d" / ".flashdreams.lock").exists()


def test_two_concurrent_runs_into_one_directory(tmp_path):
    """Both start together: one writes, the other refuses (exit 2); the result is whole."""
    processes = [
        subprocess.Popen(
            [
                *cli_command(),
                *TINY_SMALL,
                "runner.num_chunks=3",
                "runner.output_dir=d",
                f"runner.seed={seed}",
            ],
            cwd=tmp_path,
            env=quiet_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for seed in (1, 2)
    ]
    outcomes = [(p.wait(timeout=180), p.communicate()[1]) for p in processes]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    winner_seed = 1 if outcomes[0][0] == 0 else 2
    refusal = next(stderr for code, stderr in outcomes if code == 2)
    assert "is in use by another run (pid" in refusal or "already holds a run" in refusal, refusal
    run_dir = tmp_path / "d"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["runner"]["seed"] == winner_seed
    stats = _stats(run_dir)
    assert stats["status"] == "completed" and stats["num_chunks_written"] == 3
    assert read_mp4(run_dir / "video.mp4")[0].shape[0] == tiny_frames_of(3)


# ---- item 4: Ctrl-C and stop requests inside a long chunk -----------------------------------------


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    """Started in its own session, like a shell job, so killpg reaches it and ffmpeg alike."""
    return subprocess.Popen(
        [*cli_command(), *args], cwd=cwd, env=quiet_env(), stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _wait_for_log(process: subprocess.Popen, log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and text in log.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never logged: {process.communicate()[1]}")


def test_ctrl_c_keeps_a_playable_video_and_says_one_line(tmp_path):
    run_dir = tmp_path / "run"
    process = _start([*TINY_SMALL, "runner.num_chunks=100", "runner.output_dir=run"], tmp_path)
    _wait_for_log(process, run_dir / "log_rank0.txt", "chunk 10/100")  # logged every 10 chunks
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    last_progress = max(i for i, line in enumerate(lines) if "| INFO    |" in line)
    not_progress = lines[last_progress + 1 :]  # what the signal printed
    assert len(not_progress) <= 2, stderr  # the kept-chunks warning and the final line
    assert not_progress[-1].startswith("flashdreams-run: interrupted by SIGINT"), stderr
    stats = _stats(run_dir)
    assert stats["status"] == "interrupted"
    written = stats["num_chunks_written"]
    assert 10 <= written < 100
    assert f"{written} chunk(s) kept" in not_progress[-1]
    frames, _ = read_mp4(run_dir / "video.mp4")
    assert frames.shape == (tiny_frames_of(written), 32, 32, 3)


def test_stop_request_in_a_long_chunk_acts_within_a_denoising_step(tmp_path):
    """2,000 denoising steps per chunk (seconds); SIGTERM in chunk 1 stops between two steps."""
    num_steps = 2000
    run_dir = tmp_path / "run"
    process = _start(
        [*TINY_SMALL, "runner.num_chunks=2", "runner.output_dir=run",
         f"pipeline.diffusion_model.scheduler.num_inference_steps={num_steps}"],
        tmp_path,
    )  # fmt: skip
    _wait_for_log(process, run_dir / "log_rank0.txt", "chunk 1/2")
    time.sleep(0.5)  # well inside chunk 1
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    stats = _stats(run_dir)
    assert stats["status"] == "interrupted" and stats["num_chunks_written"] == 1
    assert "before denoising step" in stats["error"] and "of AR step 1" in stats["error"]
    stopped_at = int(stats["error"].split("before denoising step ")[1].split()[0])
    assert 0 < stopped_at < num_steps, stats["error"]
    seconds_per_step = stats["chunks"][0]["generate_s"] / num_steps
    # Acted on at the next step boundary: far below the seconds the chunk still needed.
    assert stats["stop_latency_s"] < max(0.5, 50 * seconds_per_step), stats
    assert read_mp4(run_dir / "video.mp4")[0].shape[0] == tiny_frames_of(1)


# ---- item 5: prompts as people type them ---------------------------------------------------------------


PROMPT = 'a cat, surfing (it\'s "great") \U0001f431 \u732b\u5728\u51b2\u6d6a ${HOME} $USER \\${x}\nsecond line\\'


def test_prompt_reaches_the_encoder_verbatim(tmp_path):
    """Commas, quotes, parentheses, emoji, CJK, ``${HOME}``, a newline and backslashes."""
    assert len(PROMPT.encode()) < 128  # every byte is a token of the tiny byte tokenizer
    result = run_flashdreams([*TINY_SMALL, "runner.num_chunks=1", "runner.output_dir=p", "runner.save_latents=true",
                   "pipeline.text_encoder.text_len=128",
                   "pipeline.diffusion_model.transformer.network.text_len=128",
                   f"runner.prompt={PROMPT}"],
                  tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "p"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["runner"]["prompt"] == PROMPT
    assert _stats(run_dir)["rollouts"][0]["prompt"] == PROMPT
    assert os.environ["HOME"] not in (run_dir / "config.yaml").read_text()

    # The tokens: the same weights and noise with the exact prompt, in this process, give the
    # very latents the CLI wrote; a prompt one character off does not.
    from safetensors.torch import load_file

    written = load_file(str(run_dir / "latents.safetensors"))["latents"]
    assert _latents_in_process(run_dir, tmp_path / "same", PROMPT).equal(written)
    assert not _latents_in_process(run_dir, tmp_path / "other", PROMPT[:-1]).equal(written)

    printed = run_flashdreams([*TINY_SMALL, f"runner.prompt={PROMPT}", "--cfg", "job"], tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["runner"]["prompt"] == PROMPT


def _latents_in_process(saved_run: Path, run_dir: Path, prompt: str):
    from safetensors.torch import load_file

    from flashdreams.infra.config import derive_config
    from flashdreams.launch.run_config import load_run_config
    from flashdreams.runner.runner import RunContext

    config = load_run_config(saved_run / "config.yaml")
    runner_config = derive_config(config.runner, prompt=prompt, output_dir=str(run_dir))
    runner = runner_config.setup(
        pipeline_config=config.pipeline, context=RunContext(run_dir=run_dir)
    )
    runner.run()
    return load_file(str(run_dir / "latents.safetensors"))["latents"]


def test_stop_request_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 only: the ranks agree at the next denoising step and both stop
    there (no rank is left waiting in a collective until the process-group timeout)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for rank in range(2):
        env = dict(quiet_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        processes.append(
            subprocess.Popen(
                [
                    *cli_command(),
                    *TINY_SMALL,
                    "runner.num_chunks=2",
                    "runner.output_dir=run",
                    "pipeline.diffusion_model.scheduler.num_inference_steps=2000",
                ],
                cwd=tmp_path,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    try:
        _wait_for_log(processes[0], tmp_path / "run" / "log_rank0.txt", "chunk 1/2")
        time.sleep(0.5)
        processes[1].send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        outcomes = [(p.wait(timeout=60), p.communicate()[1]) for p in processes]
    finally:
        for process in processes:
            process.kill()
    assert time.monotonic() - signalled < 30
    assert [code for code, _ in outcomes] == [143, 143], outcomes
    stats = _stats(tmp_path / "run")
    assert stats["status"] == "interrupted" and stats["num_chunks_written"] == 1
    assert "before denoising step" in stats["error"] and "of AR step 1" in stats["error"]
    step = stats["error"].split("before denoising step ")[1].split()[0]
    assert f"before denoising step {step} of AR step 1" in outcomes[1][1], outcomes[1][1]
