"""Helpers for the end-to-end tests: run the CLI as a user would, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

FAKE_PIPELINE_DIR = Path(__file__).parent / "fake_pipeline"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cli_command() -> list[str]:
    executable = shutil.which("flashdreams-run")
    return [executable] if executable else [sys.executable, "-m", "flashdreams.launch"]


def run_cli(
    args: list[str],
    cwd: Path,
    *,
    fake_pipeline: bool = False,
    prefix: list[str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if fake_pipeline:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(FAKE_PIPELINE_DIR), env.get("PYTHONPATH", "")) if p
        )
        env["FLASHDREAMS_CONF_PATH"] = str(FAKE_PIPELINE_DIR / "conf")
    command = (prefix or []) + (cli_command() if prefix is None else ["flashdreams-run"]) + args
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_dirs(root: Path, slug: str) -> list[Path]:
    base = root / "outputs" / slug
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def tiny_pipeline_args() -> tuple[list[str], bool]:
    """(CLI args selecting the tiny T2V pipeline, whether it is the test stand-in: never)."""
    return ["wan-tiny-t2v"], False


def slurm_is_up() -> tuple[bool, str]:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False, "no SLURM client tools (sbatch/sinfo); .ci/run starts a local cluster"
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"sinfo failed: {error}"
    states = result.stdout.split()
    if result.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return False, f"no SLURM node up (sinfo: {result.stdout.strip() or result.stderr.strip()})"
    return True, ""


TINY_SMALL = ["wan-tiny-t2v", "runner.height=32", "runner.width=32"]
"""The tiny T2V slug at 32x32 pixels."""
TINY_LEN_T = 2
"""Latent frames per chunk of wan-tiny-t2v."""


def tiny_frames_of(num_chunks: int) -> int:
    """Frames of ``num_chunks`` tiny chunks (causal Wan VAE: 1 for the first latent frame,
    4 for every later one)."""
    return 1 + 4 * (num_chunks * TINY_LEN_T - 1)


def quiet_env() -> dict[str, str]:
    """The test environment without FLASHDREAMS_TRACEBACK, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FLASHDREAMS_TRACEBACK", None)
    return env


def run_flashdreams(
    args: list[str], cwd: Path, timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cli_command(), *args], cwd=cwd, env=quiet_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def single_error_line(stderr: str) -> str:
    """The one ``flashdreams-run: error:`` line of ``stderr`` (asserts there is exactly one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("flashdreams-run: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def launch_ranks(
    args: list[str], cwd: Path, num_ranks: int, env: dict[str, str], *, timeout: float = 90
) -> list[tuple[int, str, float]]:
    """Start ``num_ranks`` CLI processes like ``srun`` would (no torchrun agent to tear the
    survivors down); ``(exit code, stderr, seconds from the start to its exit)`` per rank."""
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    started = time.monotonic()
    for rank in range(num_ranks):
        rank_env = dict(
            env,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(num_ranks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        processes.append(
            subprocess.Popen(
                [*cli_command(), *args], cwd=cwd, env=rank_env, stderr=subprocess.PIPE, text=True
            )
        )

    def finish(process: subprocess.Popen) -> tuple[int, str, float]:
        _, stderr = process.communicate(timeout=timeout)
        return process.returncode, stderr, time.monotonic() - started

    with ThreadPoolExecutor(num_ranks) as pool:  # each rank's own exit time
        futures = [pool.submit(finish, process) for process in processes]
        try:
            return [future.result() for future in futures]
        except subprocess.TimeoutExpired:
            for process in processes:
                process.kill()
            raise
