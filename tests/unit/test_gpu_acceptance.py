"""bench/gpu/acceptance.sh --dry-run: the one-call GPU acceptance plumbing, on CPU."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "gpu" / "acceptance.sh"
STEPS = ["setup", "env", "gpu-tests", "bench-gpu", "torchrun", "cold-start"]


def run_acceptance(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        cwd=REPO_ROOT,
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] in STEPS:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def dry_run() -> subprocess.CompletedProcess:
    return run_acceptance("--dry-run")


def test_dry_run_passes_every_step_and_prints_one_table(dry_run) -> None:
    assert dry_run.returncode == 0, dry_run.stdout[-4000:] + dry_run.stderr[-2000:]
    rows = table_rows(dry_run.stdout)
    assert list(rows) == STEPS
    assert all(row[1] == "pass" for row in rows.values()), rows
    assert "torchrun-ok world=1 chunks=2" in rows["torchrun"][3]
    assert "ratio dit:" in rows["cold-start"][3]
    assert "acceptance: all steps passed" in dry_run.stdout


def test_dry_run_records_nothing(dry_run) -> None:
    results = (REPO_ROOT / "bench" / "RESULTS.md").read_text()
    assert "### GPU acceptance run" not in results.split("## Summary")[0]
    assert "[appended to bench/RESULTS.md]" not in dry_run.stdout


def test_a_failing_step_fails_the_run_and_the_others_still_run(tmp_path) -> None:
    # A torchrun on PATH that fails, as a broken NCCL start-up would.
    fake = tmp_path / "torchrun"
    fake.write_text("#!/bin/sh\necho 'rendezvous failed' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    completed = run_acceptance("--dry-run", env=env)
    assert completed.returncode == 1
    rows = table_rows(completed.stdout)
    assert list(rows) == STEPS
    assert rows["torchrun"][1] == "**FAIL**"
    assert rows["torchrun"][3].startswith("exit 3; log ")
    assert rows["cold-start"][1] == "pass"
    assert "rendezvous failed" in completed.stdout
    assert "acceptance: 1 step(s) failed" in completed.stderr


def test_unknown_argument_is_refused() -> None:
    completed = run_acceptance("--fast")
    assert completed.returncode == 2
    assert "unknown argument '--fast' (use --dry-run or --help)" in completed.stderr
