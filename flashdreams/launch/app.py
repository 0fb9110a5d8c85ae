"""The Hydra task: composed config -> typed configs -> process group -> runner.

Every rank composes the same config; rank 0 picks the run directory and
broadcasts it, so all ranks agree on one directory. Loguru logs are tagged
with the rank and each rank also logs to ``<run_dir>/log_rank<r>.txt``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

USER_ERRORS = (KeyError, ValueError, FileNotFoundError, TypeError)
"""Exceptions reported as a one-paragraph error instead of a traceback."""

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


def choose_run_dir(output_dir: str | None, slug: str, job_number: int | None) -> Path:
    """Rank 0's choice: ``output_dir`` or a fresh ``outputs/<slug>/<time>[_job<n>]``."""
    if output_dir is not None:
        path = Path(output_dir)
        return path / f"job{job_number}" if job_number is not None else path
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    name = stamp if job_number is None else f"{stamp}_job{job_number}"
    base = Path("outputs") / slug / name
    candidate, suffix = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            candidate = base.with_name(f"{name}-{suffix}")
            suffix += 1


def configure_logging(rank: int, run_dir: Path | None) -> list[int]:
    """Rank-tagged loguru sinks: stderr (INFO on rank 0, WARNING elsewhere) and a per-rank file."""
    from loguru import logger

    logger.remove()
    logger.configure(extra={"rank": rank})
    line = "{time:HH:mm:ss} | rank {extra[rank]} | {level: <7} | {message}"
    sink_ids = [logger.add(sys.stderr, level="INFO" if rank == 0 else "WARNING", format=line)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        sink_ids.append(
            logger.add(str(run_dir / f"log_rank{rank}.txt"), level="DEBUG", format=line)
        )
    return sink_ids


class RunFailed(RuntimeError):
    """A run-time failure on this rank, with where it happened (rank, AR step, stage)."""

    def __init__(self, report: Any) -> None:
        self.report = report
        super().__init__(report.describe())


def _remove_unfinished_run_dir(run_dir: Path, created_here: bool, auto_named: bool) -> None:
    """Nothing was produced: leave no directory behind that could pass for a finished run.

    A directory this run created is removed (with the empty ``outputs/<slug>/``
    parents of an auto-named one); in a directory that existed before only
    ``config.yaml`` / ``stats.json`` are removed.
    """
    import shutil

    if created_here:
        shutil.rmtree(run_dir, ignore_errors=True)
        if auto_named:
            for parent in list(run_dir.parents)[:2]:
                try:
                    parent.rmdir()  # only when empty
                except OSError:
                    break
    else:
        for name in ("config.yaml", "stats.json"):
            (run_dir / name).unlink(missing_ok=True)


def run(container: dict[str, Any], job_number: int | None = None) -> dict[str, Any] | None:
    """Run one job from the composed, resolved config (plain data); returns rank 0's stats.

    Failures: user errors propagate as they are; SIGTERM as ``RunInterrupted``; a
    failure of another rank as ``PeerRankFailed``; anything else as :class:`RunFailed`
    naming this rank and AR step. Every failing rank posts a notice that stops the
    other ranks (:class:`~flashdreams.runner.safety.RankFailureChannel`). When no
    chunk was written yet, rank 0 removes the run directory it created.
    """
    from loguru import logger

    from flashdreams.launch.distributed import (
        broadcast_from_rank0,
        init_distributed,
        shutdown_distributed,
    )
    from flashdreams.launch.run_config import build_run_config, run_config_to_container
    from flashdreams.runner.runner import RunContext, validate_runner_config
    from flashdreams.runner.safety import (
        FailureReport,
        PeerRankFailed,
        RankFailureChannel,
        RunInterrupted,
        StopGuard,
    )

    run_config = build_run_config(container)
    validate_runner_config(run_config.runner)  # before any directory is created
    resolved = run_config_to_container(run_config)
    context = init_distributed(run_config.parallel.backend, run_config.parallel.init_timeout_s)
    sink_ids: list[int] = []
    channel = None
    runner = None
    run_dir: Path | None = None
    created_here = False
    with StopGuard() as guard:
        try:
            if context.world_size > 1:
                channel = RankFailureChannel.from_environment(rank=context.rank, guard=guard)
                channel.start()
            if context.rank == 0:
                output_dir = run_config.runner.output_dir
                existed = output_dir is not None and Path(output_dir).exists()
                run_dir = choose_run_dir(output_dir, run_config.pipeline.name, job_number)
                created_here = not existed
            run_dir = Path(str(broadcast_from_rank0(str(run_dir), context)))
            sink_ids = configure_logging(context.rank, run_dir)
            device = str(context.device)
            logger.info(
                f"pipeline '{run_config.pipeline.name}' on {context.world_size} rank(s), "
                f"device {device}, run directory {run_dir}"
            )
            runner = run_config.runner.setup(
                pipeline_config=run_config.pipeline,
                context=RunContext(
                    run_dir=run_dir,
                    rank=context.rank,
                    world_size=context.world_size,
                    device=device,
                    resolved_config=resolved,
                    stop_guard=guard,
                ),
            )
            stats = runner.run()
            if channel is not None:
                channel.stop()
            # Success path only: after a failure the process exits non-zero; the other
            # ranks learn it from the failure channel (or the launcher tears them down).
            shutdown_distributed(context)
            return stats if context.rank == 0 else None
        except BaseException as error:
            progress = getattr(runner, "progress", None)
            report = FailureReport(
                rank=context.rank,
                autoregressive_index=getattr(progress, "autoregressive_index", None),
                stage=getattr(progress, "stage", "start-up"),
                message=f"{type(error).__name__}: {error}",
            )
            if channel is not None and not isinstance(error, (PeerRankFailed, RunInterrupted)):
                channel.post(report)
            if sink_ids and not isinstance(error, (PeerRankFailed, RunInterrupted)):
                logger.opt(exception=error).debug(f"rank {context.rank} failed")
            nothing_written = getattr(progress, "num_chunks_written", 0) == 0
            if context.rank == 0 and run_dir is not None and nothing_written:
                for sink_id in sink_ids:
                    logger.remove(sink_id)
                sink_ids = []
                _remove_unfinished_run_dir(
                    run_dir, created_here, run_config.runner.output_dir is None
                )
            if isinstance(error, (*USER_ERRORS, PeerRankFailed, RunInterrupted)) or not isinstance(
                error, Exception
            ):
                raise
            raise RunFailed(report) from error
        finally:
            if channel is not None:
                channel.stop()
            for sink_id in sink_ids:
                logger.remove(sink_id)


def _rank_prefix() -> str:
    """``[rank r] `` under torchrun / srun with more than one rank, else empty."""
    try:
        from flashdreams.core.distributed import parse_launch_environment

        launch = parse_launch_environment()
    except ValueError:
        return ""
    return f"[rank {launch.rank}] " if launch.world_size > 1 else ""


TRACEBACK_ENV = "FLASHDREAMS_TRACEBACK"
"""Set to 1 to get Python tracebacks instead of one-paragraph errors."""


def hydra_task(cfg: Any) -> None:
    """Task function handed to ``hydra.main``; also what the submitit launcher pickles.

    Errors become one paragraph on stderr and an exit code: 2 for bad user input,
    1 for run-time failures (a rank failed, non-finite output), 143 for SIGTERM.
    ``FLASHDREAMS_TRACEBACK=1`` re-raises instead (Hydra prints the traceback).
    """
    from omegaconf import OmegaConf

    from flashdreams.runner.safety import (
        EXIT_INTERRUPTED,
        EXIT_RUNTIME_ERROR,
        PeerRankFailed,
        RunInterrupted,
    )

    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        run(container, job_number=_hydra_job_number())
    except RunInterrupted as error:
        print(
            f"flashdreams-run: {_rank_prefix()}{error}; the chunks written so far are kept "
            "and stats.json says status: interrupted",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(format_user_error(error, _rank_prefix()), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (RunFailed, PeerRankFailed) as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        hint = (
            ""
            if isinstance(error, PeerRankFailed)
            else f" (set {TRACEBACK_ENV}=1 for the traceback)"
        )
        print(format_user_error(error, _rank_prefix()) + hint, file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)
