"""The Hydra task: composed config -> typed configs -> process group -> runner.

Every rank composes the same config; rank 0 picks the run directory and
broadcasts it, so all ranks agree on one directory. Loguru logs are tagged
with the rank and each rank also logs to ``<run_dir>/log_rank<r>.txt``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

USER_ERRORS = (KeyError, ValueError, FileNotFoundError)
"""Exceptions reported as a one-paragraph error instead of a traceback (bad input). A
``TypeError`` is a programming error: it is reported as a run-time failure."""

EXIT_USER_ERROR = 2


def format_user_error(error: BaseException, prefix: str = "") -> str:
    """One line: ``flashdreams-run: error: <prefix><message>``."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(f"flashdreams-run: error: {prefix}{message}".split())


def _hydra_job_number() -> int | None:
    """Index of this job in a ``-m`` sweep, ``None`` for a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_config = HydraConfig.get()
        if hydra_config.mode == RunMode.MULTIRUN:
            return int(hydra_config.job.num)
    except (ImportError, ValueError, AttributeError):
        pass
    return None


class FileLogSink:
    """A loguru sink writing one run's log file; a failed write (a full disk) silences it.

    Loguru would print a traceback for every record once the disk is full; the run's
    own error already names the disk, so the log just stops.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.failed: OSError | None = None

    def write(self, message: str) -> None:
        if self._handle is None:
            return
        try:
            self._handle.write(message)
            self._handle.flush()
        except OSError as error:
            self.failed = error
            self.close()

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass


def configure_logging(rank: int, run_dir: Path | None) -> list[int]:
    """Rank-tagged loguru sinks: stderr (INFO on rank 0, WARNING elsewhere) and a per-rank file."""
    from loguru import logger

    # Import-time notices of optional kernels a CPU build cannot load (torchao, which
    # transformers imports whenever it is installed) and of torch's pytree deprecations:
    # nothing a user can act on.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logger.remove()
    logger.configure(extra={"rank": rank})
    line = "{time:HH:mm:ss} | rank {extra[rank]} | {level: <7} | {message}"
    sink_ids = [logger.add(sys.stderr, level="INFO" if rank == 0 else "WARNING", format=line)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_sink = FileLogSink(run_dir / f"log_rank{rank}.txt")
        sink_ids.append(logger.add(file_sink.write, level="DEBUG", format=line))
    return sink_ids


def remove_log_sinks(sink_ids: list[int]) -> None:
    """Remove the sinks that :func:`configure_logging` added (each at most once)."""
    from loguru import logger

    while sink_ids:
        try:
            logger.remove(sink_ids.pop())
        except ValueError:
            pass  # already removed


class RunFailed(RuntimeError):
    """A run-time failure on this rank, with where it happened (rank, AR step, stage)."""

    def __init__(self, report: Any) -> None:
        self.report = report
        super().__init__(report.describe())


def run(container: dict[str, Any], job_number: int | None = None) -> dict[str, Any] | None:
    """Run one job from the composed, resolved config (plain data); returns rank 0's stats.

    Failures: user errors propagate as they are; SIGTERM / SIGINT as ``RunInterrupted``; a
    failure of another rank as ``PeerRankFailed``; anything else as :class:`RunFailed`
    naming this rank and AR step. Every failing rank posts a notice that stops the
    other ranks (:class:`~flashdreams.runner.safety.RankFailureChannel`). When no
    chunk was written yet, rank 0 removes the files and directories this run created
    (:mod:`flashdreams.launch.run_dir`), and nothing else.
    """
    from flashdreams.runner.startup import StartupClock

    clock = StartupClock.begin()
    from flashdreams.core.distributed import shutdown_distributed
    from flashdreams.launch.distributed import start_process_group
    from flashdreams.launch.run_config import (
        build_run_config,
        run_config_to_container,
        run_config_yaml,
    )
    from flashdreams.runner.preflight import validate_before_work
    from flashdreams.runner.runner import RunContext
    from flashdreams.runner.safety import RankFailureChannel, StopGuard

    clock.mark("import")
    run_config = build_run_config(container)
    # Before any directory is created, any weight loaded or any rank waited for.
    validate_before_work(run_config, world_size=_launch_world_size())
    config_yaml = run_config_yaml(run_config_to_container(run_config))
    clock.mark("config")
    context = start_process_group(run_config.parallel.backend, run_config.parallel.init_timeout_s)
    job = _JobState()
    with StopGuard() as guard:
        try:
            if context.world_size > 1:
                job.channel = RankFailureChannel.from_environment(rank=context.rank, guard=guard)
                job.channel.start()
            plan = run_config.parallel.build_plan()  # validated once, groups created once
            run_dir = _agree_on_run_dir(run_config, context, job_number, job)
            _log_random_weights(run_config)
            clock.mark("distributed")
            job.runner = run_config.runner.setup(
                pipeline_config=run_config.pipeline,
                context=RunContext(
                    run_dir=run_dir,
                    rank=context.rank,
                    world_size=context.world_size,
                    device=str(context.device),
                    config_yaml=config_yaml,
                    stop_guard=guard,
                    parallel=plan,
                    startup=clock,
                ),
            )
            stats = job.runner.run()
            if job.channel is not None:
                job.channel.stop()
            # Success path only: after a failure the process exits non-zero; the other
            # ranks learn it from the failure channel (or the launcher tears them down).
            shutdown_distributed(context)
            return stats if context.rank == 0 else None
        except BaseException as error:
            _handle_failure(error, context.rank, job)
        finally:
            job.close()
    raise AssertionError("unreachable: the try block returns or raises")


class _JobState:
    """What :func:`run` holds while a job runs, for its failure path and clean-up."""

    def __init__(self) -> None:
        self.channel: Any = None
        """Rank-failure channel (several ranks only)."""
        self.runner: Any = None
        """The runner, once built (its progress says where a failure happened)."""
        self.claimed: Any = None
        """Rank 0's claimed run directory."""
        self.sink_ids: list[int] = []
        """Log sinks of this job."""

    def close(self) -> None:
        if self.channel is not None:
            self.channel.stop()
        remove_log_sinks(self.sink_ids)
        if self.claimed is not None:
            self.claimed.release()


def _agree_on_run_dir(
    run_config: Any, context: Any, job_number: int | None, job: _JobState
) -> Path:
    """Rank 0 claims the run directory and broadcasts it; every rank starts logging there."""
    from loguru import logger

    from flashdreams.launch.distributed import broadcast_from_rank0
    from flashdreams.launch.run_dir import claim_run_dir

    run_dir = None
    if context.rank == 0:
        job.claimed = claim_run_dir(
            run_config.runner.output_dir,
            run_config.pipeline.name,
            job_number,
            overwrite=run_config.runner.overwrite,
        )
        run_dir = job.claimed.path
    run_dir = Path(str(broadcast_from_rank0(str(run_dir), context)))
    job.sink_ids = configure_logging(context.rank, run_dir)
    logger.info(
        f"pipeline '{run_config.pipeline.name}' on {context.world_size} rank(s), "
        f"device {context.device}, run directory {run_dir}"
    )
    if job.claimed is not None and job.claimed.removed_previous:
        logger.warning(
            f"runner.overwrite=true: deleted the earlier run's "
            f"{', '.join(job.claimed.removed_previous)} in {run_dir}"
        )
    return run_dir


def _handle_failure(error: BaseException, rank: int, job: _JobState) -> None:
    """Tell the other ranks, log, clean up an empty run directory, then raise."""
    from loguru import logger

    from flashdreams.runner.safety import FailureReport, PeerRankFailed, RunInterrupted

    progress = getattr(job.runner, "progress", None)
    report = FailureReport(
        rank=rank,
        autoregressive_index=getattr(progress, "autoregressive_index", None),
        stage=getattr(progress, "stage", "start-up"),
        message=f"{type(error).__name__}: {error}",
    )
    own_failure = not isinstance(error, (PeerRankFailed, RunInterrupted))
    if job.channel is not None and own_failure:
        job.channel.post(report)
    if job.sink_ids and own_failure:
        logger.opt(exception=error).debug(f"rank {rank} failed")
    num_chunks_written = getattr(progress, "num_chunks_written", 0)
    if isinstance(error, RunInterrupted):
        error.num_chunks_written = num_chunks_written
        error.writes_output = rank == 0  # every plan writes on rank 0
    if job.claimed is not None and num_chunks_written == 0:
        remove_log_sinks(job.sink_ids)
        job.claimed.remove_unfinished()
    if isinstance(error, (*USER_ERRORS, PeerRankFailed, RunInterrupted)) or not isinstance(
        error, Exception
    ):
        raise error
    raise RunFailed(report) from error


def _log_random_weights(run_config: Any) -> None:
    """Name the components that ``runner.allow_random_weights=true`` leaves random."""
    from loguru import logger

    from flashdreams.runner.preflight import check_checkpoints

    if not run_config.runner.allow_random_weights:
        return
    random_keys = check_checkpoints(run_config.pipeline, allow_random_weights=True)
    if random_keys:
        logger.info(
            "random weights (runner.allow_random_weights=true) for "
            + ", ".join(key.removesuffix(".checkpoint_path") for key in random_keys)
        )


def _launch_world_size() -> int:
    """The number of ranks the environment describes (torchrun, srun), 1 when unsure."""
    try:
        from flashdreams.core.distributed import parse_launch_environment

        return parse_launch_environment().world_size
    except ValueError:
        return 1


def _rank_prefix() -> str:
    """``[rank r] `` under torchrun / srun with more than one rank, else empty."""
    try:
        from flashdreams.core.distributed import parse_launch_environment

        launch = parse_launch_environment()
    except ValueError:
        return ""
    return f"[rank {launch.rank}] " if launch.world_size > 1 else ""


def _interrupted_outcome(error: BaseException) -> str:
    """What an interrupted run kept, as this rank can tell: only rank 0 writes the video."""
    if not getattr(error, "writes_output", True):
        return "rank 0 writes the output (its line says what was kept)"
    kept = getattr(error, "num_chunks_written", 0)
    if kept:
        return f"{kept} chunk(s) kept in a playable video; stats.json says status: interrupted"
    return "no chunk was written, so nothing was kept"


TRACEBACK_ENV = "FLASHDREAMS_TRACEBACK"
"""Set to 1 to get Python tracebacks instead of one-paragraph errors."""


def hydra_task(cfg: Any) -> None:
    """Task function handed to ``hydra.main``; also what the submitit launcher pickles.

    Errors become one paragraph on stderr and an exit code: 2 for bad user input,
    1 for run-time failures (a rank failed, non-finite output, a full disk), 130 for
    SIGINT and 143 for SIGTERM. ``FLASHDREAMS_TRACEBACK=1`` also prints the traceback
    (the exit code stays the same).
    """
    from omegaconf import OmegaConf

    from flashdreams.runner.safety import EXIT_RUNTIME_ERROR, PeerRankFailed, RunInterrupted

    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        run(container, job_number=_hydra_job_number())
    except RunInterrupted as error:
        print(
            f"flashdreams-run: {_rank_prefix()}{error}; {_interrupted_outcome(error)}",
            file=sys.stderr,
        )
        sys.exit(error.exit_code)
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exc()
        print(format_user_error(error, _rank_prefix()), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (RunFailed, PeerRankFailed) as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exc()
        hint = (
            ""
            if isinstance(error, PeerRankFailed)
            else f" (set {TRACEBACK_ENV}=1 for the traceback)"
        )
        print(format_user_error(error, _rank_prefix()) + hint, file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)
