"""Watching the jobs of a submitit sweep (``-m hydra/launcher=submitit_local|submitit_slurm``).

The launcher (``hydra_plugins.flashdreams_submitit``) submits the jobs and hands them to
:func:`watch_sweep_jobs`, which prints one line per job when it is submitted and when it
ends (ok / failed, elapsed), a ``N of M jobs done`` line every ``progress_interval_s``
while they run, and, once all have ended, one error line per failed job: its swept
values, its submitit job id, its own one-line error (from its result or the end of its
stderr log) and the log to read. A sweep with a failed job exits with
:data:`~flashdreams.runner.safety.EXIT_RUNTIME_ERROR`; the outputs of the jobs that
finished are kept.

Nothing here imports torch or the models; it runs in the submitting process.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "flashdreams-run: "
"""Start of every line this module prints (stderr)."""

PEER_FAILURE_MARK = "stopping because rank"
"""In the line of a rank that stopped because another rank failed (not the cause)."""

SLURM_ERROR_PREFIX = "slurmstepd: error:"
"""SLURM's own lines in a job's log (cancelled, time limit, out-of-memory kill)."""

_PYTHON_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Fault)\b.*")


@dataclass
class SweepJob:
    """One submitted job of the sweep and what the watcher learned about it."""

    number: int
    """Hydra's job number (``hydra.job.num``)."""
    swept: str
    """The job's swept values, ``runner.seed=1 runner.num_chunks=3``."""
    job: Any
    """The ``submitit.Job``."""
    submitted_at: float
    """``time.monotonic()`` when it was submitted."""
    elapsed_s: float | None = None
    """Seconds from submission until the watcher saw it end; ``None`` while it runs."""
    result: Any = None
    """Hydra's ``JobReturn`` of a job that succeeded."""
    error: str | None = None
    """The job's one-line error when it failed."""
    log_path: Path | None = None
    """The log holding the failed job's full error output."""

    def name(self, with_job_id: bool = False) -> str:
        """``sweep job 1 (runner.seed=1)``; with the submitit job id inside the parentheses."""
        details = [self.swept] if self.swept else []
        if with_job_id:
            details.append(f"submitit job {self.job.job_id}")
        return f"sweep job {self.number}" + (f" ({', '.join(details)})" if details else "")


def swept_values(job_overrides: Sequence[str], swept_keys: set[str]) -> str:
    """The overrides of one job whose keys the command line swept, space separated."""
    shown = []
    for override in job_overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in swept_keys:
            shown.append(f"{key}={override.split('=', 1)[1]}" if "=" in override else key)
    return " ".join(shown)


def swept_keys_of(task_overrides: Sequence[str]) -> set[str]:
    """Keys of the command-line overrides that sweep (``runner.seed=0,1``, ``choice(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def last_error_line(text: str | None) -> str | None:
    """The last line of a job's log that states its error, without our ``error:`` prefix.

    Preference: our own one-line error (``flashdreams-run: error: ...`` or
    ``flashdreams-run: interrupted ...``), then SLURM's own (``slurmstepd: error: ***
    JOB 14 CANCELLED ...``, an out-of-memory kill), then the last Python exception line
    (``ValueError: ...``) of a traceback.
    """
    if not text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith(PREFIX)]
    if ours:
        return ours[-1].removeprefix(PREFIX).removeprefix("error: ")
    slurm_errors = [line for line in lines if line.startswith(SLURM_ERROR_PREFIX)]
    if slurm_errors:
        return slurm_errors[-1]
    python_errors = [line for line in lines if _PYTHON_ERROR_LINE.match(line)]
    return python_errors[-1] if python_errors else None


def _task_logs(job: Any) -> list[tuple[int, Path]]:
    """``(task, stderr path)`` of every task (rank) of a submitit job."""
    return [(task, job.task(task).paths.stderr) for task in range(job.num_tasks)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def diagnose_failure(job: Any) -> tuple[str | None, Path]:
    """``(one-line error, log path)`` of a failed submitit job, from its tasks' stderr logs.

    A rank that failed by itself names the cause; ranks that only stopped because of it
    (``stopping because rank r failed ...``) are used when no other line is found. The
    error is ``None`` when no log holds an error line.
    """
    found: list[tuple[str, Path]] = []
    for _task, path in _task_logs(job):
        line = last_error_line(_read(path))
        if line is not None:
            found.append((line, path))
    causes = [item for item in found if PEER_FAILURE_MARK not in item[0]]
    if causes or found:
        return (causes or found)[0]
    first_log = _task_logs(job)[0][1]
    return None, first_log if first_log.exists() else job.task(0).paths.stdout


def _job_state(job: Any) -> str:
    try:
        return str(job.state)
    except Exception:  # noqa: BLE001 - the state is only shown, never decided on
        return "unknown"


def _load_result(job: Any, grace_s: float) -> tuple[str, Any] | None:
    """Task 0's pickled ``(outcome, value)``, waiting up to ``grace_s`` for the file."""
    from submitit.core import utils as submitit_utils

    path = job.task(0).paths.result_pickle
    deadline = time.monotonic() + grace_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not path.exists():
        return None
    return submitit_utils.pickle_load(path)


def settle(sweep_job: SweepJob, result_grace_s: float) -> None:
    """Record how a job that has ended went: its ``JobReturn``, or its one-line error.

    A job that printed our one-line error exited without a result, so the wait of up to
    ``result_grace_s`` for a late result file (a shared filesystem) is only for the rest.
    """
    from hydra.core.utils import JobStatus

    job = sweep_job.job
    outcome = _load_result(job, 0.0)
    error, log_path = (None, None) if outcome is not None else diagnose_failure(job)
    if outcome is None and error is None:
        outcome = _load_result(job, result_grace_s)
    if outcome is None:
        state = _job_state(job)
        sweep_job.error = error or (
            f"it ended without an error message (state: {state})"
            if log_path.name.endswith(".err")
            else f"it ended without writing a log (state: {state})"
        )
        sweep_job.log_path = log_path
        return
    sweep_job.log_path = _task_logs(job)[0][1]
    if outcome[0] != "success":  # ("error", traceback text) from submitit itself
        sweep_job.error = last_error_line(outcome[1]) or "it failed (no error line)"
        return
    job_return = outcome[1]
    if job_return.status == JobStatus.COMPLETED:
        sweep_job.result, sweep_job.log_path = job_return, None
        return
    error = job_return._return_value  # the exception Hydra's run_job caught
    sweep_job.error = f"{type(error).__name__}: {error}".splitlines()[0]


def _counts(jobs: Sequence[SweepJob]) -> tuple[int, int]:
    done = [j for j in jobs if j.elapsed_s is not None]
    return len(done), sum(1 for j in done if j.error is not None)


def watch_sweep_jobs(
    jobs: Sequence[SweepJob],
    *,
    progress_interval_s: float,
    result_grace_s: float,
    poll_s: float = 1.0,
    after_interrupt: str = "",
    write: Callable[[str], None] | None = None,
) -> list[Any]:
    """Wait for every job, printing progress; return their ``JobReturn``s in order.

    When a job failed, print one error line per failed job and raise
    ``SystemExit(EXIT_RUNTIME_ERROR)`` (Hydra's error report only catches
    ``Exception``, so nothing is printed after these lines).
    """
    from flashdreams.runner.safety import EXIT_RUNTIME_ERROR

    say = write or _write_stderr
    started = time.monotonic()
    for sweep_job in jobs:
        say(
            f"{PREFIX}{sweep_job.name()} submitted as submitit job {sweep_job.job.job_id}; "
            f"log folder {sweep_job.job.paths.folder}"
        )
    last_report = started
    try:
        while any(j.elapsed_s is None for j in jobs):
            for sweep_job in jobs:
                if sweep_job.elapsed_s is not None or not sweep_job.job.done():
                    continue
                sweep_job.elapsed_s = time.monotonic() - sweep_job.submitted_at
                settle(sweep_job, result_grace_s)
                outcome = "ok" if sweep_job.error is None else "failed"
                say(f"{PREFIX}{sweep_job.name()} {outcome} after {sweep_job.elapsed_s:.1f} s")
            now = time.monotonic()
            if now - last_report >= progress_interval_s and any(j.elapsed_s is None for j in jobs):
                num_done, num_failed = _counts(jobs)
                say(
                    f"{PREFIX}sweep: {num_done} of {len(jobs)} jobs done ({num_failed} failed), "
                    f"{now - started:.0f} s elapsed"
                )
                last_report = now
            if any(j.elapsed_s is None for j in jobs):
                time.sleep(poll_s)
    except KeyboardInterrupt:
        _report_interrupt(jobs, say, after_interrupt)
        raise SystemExit(128 + 2) from None
    num_done, num_failed = _counts(jobs)
    say(
        f"{PREFIX}sweep: {num_done} of {len(jobs)} jobs done ({num_failed} failed) "
        f"in {time.monotonic() - started:.1f} s"
    )
    failed = [j for j in jobs if j.error is not None]
    for sweep_job in failed:
        say(
            f"{PREFIX}error: {sweep_job.name(with_job_id=True)} failed: {sweep_job.error}; "
            f"full log: {sweep_job.log_path}"
        )
    if failed:
        raise SystemExit(EXIT_RUNTIME_ERROR)
    return [j.result for j in jobs]


def _report_interrupt(
    jobs: Sequence[SweepJob], say: Callable[[str], None], after_interrupt: str
) -> None:
    """Ctrl-C while waiting: one line naming the jobs that had not ended."""
    ids = " ".join(str(j.job.job_id) for j in jobs if j.elapsed_s is None)
    num_done, num_failed = _counts(jobs)
    say(
        f"{PREFIX}sweep interrupted by SIGINT with {num_done} of {len(jobs)} jobs done "
        f"({num_failed} failed); stopped waiting for submitit job(s) {ids}"
        + after_interrupt.format(job_ids=ids)
    )


def _write_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
