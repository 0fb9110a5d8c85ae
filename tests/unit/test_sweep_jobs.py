"""Watching a submitit sweep (flashdreams.launch.sweep_jobs) with stand-in jobs: no processes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus

from flashdreams.launch.cli import build_hydra_args, check_submitit_launcher
from flashdreams.launch.sweep_jobs import (
    SweepJob,
    last_error_line,
    swept_keys_of,
    swept_values,
    watch_sweep_jobs,
)

OUR_LINE = (
    "flashdreams-run: error: rank 0 failed at AR step 2 (generate): InjectedFault: boom "
    "(set FLASHDREAMS_TRACEBACK=1 for the traceback)"
)


class _Paths:
    def __init__(self, folder: Path, job_id: str, task: int) -> None:
        self.folder = folder
        self.stderr = folder / f"{job_id}_{task}_log.err"
        self.stdout = folder / f"{job_id}_{task}_log.out"
        self.result_pickle = folder / f"{job_id}_{task}_result.pkl"


class FakeJob:
    """The part of ``submitit.Job`` the watcher uses; ``done()`` turns true after N polls."""

    def __init__(self, root: Path, job_id: str, polls_until_done: int, num_tasks: int = 1):
        self.job_id = job_id
        self.state = "FINISHED"
        folder = root / job_id
        folder.mkdir(parents=True)
        self._tasks = [_Paths(folder, job_id, task) for task in range(num_tasks)]
        self.paths = self._tasks[0]
        self.num_tasks = num_tasks
        self._polls_left = polls_until_done

    def task(self, task: int) -> FakeJob:
        view = object.__new__(FakeJob)
        view.__dict__.update(self.__dict__, paths=self._tasks[task])
        return view

    def done(self) -> bool:
        self._polls_left -= 1
        return self._polls_left <= 0

    def succeed(self, value: str = "ok") -> None:
        job_return = JobReturn(status=JobStatus.COMPLETED)
        job_return.return_value = value
        self.paths.result_pickle.write_bytes(pickle.dumps(("success", job_return)))


def _watch(jobs, lines, **kwargs):
    return watch_sweep_jobs(
        jobs, progress_interval_s=0.0, result_grace_s=0.0, poll_s=0.0, write=lines.append,
        **kwargs,
    )  # fmt: skip


def test_last_error_line_prefers_our_line_then_the_python_exception():
    log = f"12:00 | rank 0 | INFO | chunk 1/3\n{OUR_LINE}\n"
    assert last_error_line(log) == OUR_LINE.removeprefix("flashdreams-run: error: ")
    traceback_log = "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'a'\n"
    assert last_error_line(traceback_log) == "KeyError: 'a'"
    oom = "slurmstepd: error: Detected 1 oom_kill event in StepId=14.0."
    assert last_error_line(f"{traceback_log}{oom}\n") == oom
    assert last_error_line("just progress\n") is None
    assert last_error_line(None) is None


def test_swept_values_show_only_the_swept_keys():
    keys = swept_keys_of(["++runner.num_chunks=2,3", "++runner.height=32", "pipeline=x"])
    assert keys == {"runner.num_chunks"}
    job = ["++runner.num_chunks=3", "++runner.height=32", "pipeline=x", "hydra.searchpath=[]"]
    assert swept_values(job, keys) == "runner.num_chunks=3"


def test_plugin_launcher_names_pick_the_flashdreams_launchers(monkeypatch):
    monkeypatch.delenv("FLASHDREAMS_CONF_PATH", raising=False)
    for plugin_name in ("submitit_local", "submitit_slurm"):
        args, _ = build_hydra_args(["wan-tiny-t2v", "-m", f"hydra/launcher={plugin_name}"])
        assert f"hydra/launcher=flashdreams_{plugin_name}" in args


def test_a_missing_launcher_plugin_is_one_line_with_the_fix(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    missing = {"hydra_plugins.flashdreams_submitit"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in missing else real_find_spec(name, *a),
    )
    check_submitit_launcher(["hydra/launcher=basic"])  # not a submitit launcher: no check
    with pytest.raises(ValueError) as error:
        check_submitit_launcher(["-m", "hydra/launcher=submitit-local"])
    assert str(error.value) == (
        "hydra/launcher=submitit-local needs flashdreams' launcher plugin "
        "(hydra_plugins/flashdreams_submitit), which this installation does not have: "
        "reinstall flashdreams (pip install -e '.[slurm]' in the checkout)"
    )
    missing.add("hydra_plugins.hydra_submitit_launcher")
    with pytest.raises(ValueError, match="needs hydra-submitit-launcher, which is not installed"):
        check_submitit_launcher(["hydra/launcher=slurm"])


def test_progress_then_one_error_line_per_failed_job_and_exit_1(tmp_path):
    ok, failed = FakeJob(tmp_path, "101", 2), FakeJob(tmp_path, "102", 3, num_tasks=2)
    ok.succeed()
    # Rank 0 only stopped because rank 1 failed: rank 1's line is the cause.
    failed.task(0).paths.stderr.write_text(
        "flashdreams-run: error: [rank 0] stopping because rank 1 failed at AR step 2\n"
    )
    failed.task(1).paths.stderr.write_text(f"INFO progress\n{OUR_LINE}\n")
    jobs = [
        SweepJob(0, "runner.seed=0", ok, submitted_at=0.0),
        SweepJob(1, "runner.seed=1", failed, submitted_at=0.0),
    ]
    lines: list[str] = []
    with pytest.raises(SystemExit) as stopped:
        _watch(jobs, lines)
    assert stopped.value.code == 1
    assert lines[0] == (
        f"flashdreams-run: sweep job 0 (runner.seed=0) submitted as submitit job 101; "
        f"log folder {tmp_path / '101'}"
    )
    assert lines[1].startswith("flashdreams-run: sweep job 1 (runner.seed=1) submitted as ")
    assert lines[2] == "flashdreams-run: sweep: 0 of 2 jobs done (0 failed), 0 s elapsed"
    assert lines[3].startswith("flashdreams-run: sweep job 0 (runner.seed=0) ok after ")
    assert lines[4] == "flashdreams-run: sweep: 1 of 2 jobs done (0 failed), 0 s elapsed"
    assert lines[5].startswith("flashdreams-run: sweep job 1 (runner.seed=1) failed after ")
    assert lines[6].startswith("flashdreams-run: sweep: 2 of 2 jobs done (1 failed) in ")
    assert lines[7:] == [
        "flashdreams-run: error: sweep job 1 (runner.seed=1, submitit job 102) failed: "
        "rank 0 failed at AR step 2 (generate): InjectedFault: boom (set FLASHDREAMS_TRACEBACK=1 "
        f"for the traceback); full log: {tmp_path / '102' / '102_1_log.err'}"
    ]


def test_all_jobs_ok_returns_their_results(tmp_path):
    jobs = []
    for number in range(2):
        job = FakeJob(tmp_path, str(200 + number), 1)
        job.succeed(f"result {number}")
        jobs.append(SweepJob(number, "", job, submitted_at=0.0))
    lines: list[str] = []
    results = _watch(jobs, lines)
    assert [r.return_value for r in results] == ["result 0", "result 1"]
    assert not any("error" in line for line in lines)


def test_a_job_that_left_no_log_and_no_result_still_gets_a_line(tmp_path):
    job = FakeJob(tmp_path, "301", 1)
    job.state = "NODE_FAIL"
    lines: list[str] = []
    with pytest.raises(SystemExit):
        _watch([SweepJob(0, "", job, submitted_at=0.0)], lines)
    assert lines[-1] == (
        "flashdreams-run: error: sweep job 0 (submitit job 301) failed: it ended without "
        f"writing a log (state: NODE_FAIL); full log: {tmp_path / '301' / '301_0_log.out'}"
    )


def test_an_exception_hydra_caught_in_the_job_is_its_error(tmp_path):
    job = FakeJob(tmp_path, "401", 1)
    job_return = JobReturn(status=JobStatus.FAILED)
    job_return.return_value = TypeError("unexpected\nsecond line")
    job.paths.result_pickle.write_bytes(pickle.dumps(("success", job_return)))
    lines: list[str] = []
    with pytest.raises(SystemExit):
        _watch([SweepJob(0, "", job, submitted_at=0.0)], lines)
    assert "failed: TypeError: unexpected; full log: " in lines[-1]


def test_ctrl_c_while_waiting_is_one_line_and_exit_130(tmp_path):
    class Interrupted(FakeJob):
        def done(self) -> bool:
            raise KeyboardInterrupt

    job = Interrupted(tmp_path, "501", 1)
    lines: list[str] = []
    with pytest.raises(SystemExit) as stopped:
        _watch(
            [SweepJob(0, "", job, submitted_at=0.0)], lines, after_interrupt="; scancel {job_ids}"
        )
    assert stopped.value.code == 130
    assert lines[-1] == (
        "flashdreams-run: sweep interrupted by SIGINT with 0 of 1 jobs done (0 failed); "
        "stopped waiting for submitit job(s) 501; scancel 501"
    )
