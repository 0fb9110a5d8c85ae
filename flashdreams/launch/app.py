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


def format_user_error(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(f"flashdreams-run: error: {message}".split())


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


def run(container: dict[str, Any], job_number: int | None = None) -> dict[str, Any] | None:
    """Run one job from the composed, resolved config (plain data); returns rank 0's stats."""
    from loguru import logger

    from flashdreams.launch.distributed import (
        broadcast_from_rank0,
        init_distributed,
        shutdown_distributed,
    )
    from flashdreams.launch.run_config import build_run_config, run_config_to_container
    from flashdreams.runner.runner import RunContext, validate_runner_config

    run_config = build_run_config(container)
    validate_runner_config(run_config.runner)  # before any directory is created
    resolved = run_config_to_container(run_config)
    context = init_distributed(run_config.parallel.backend, run_config.parallel.init_timeout_s)
    sink_ids: list[int] = []
    try:
        run_dir = None
        if context.rank == 0:
            run_dir = choose_run_dir(
                run_config.runner.output_dir, run_config.pipeline.name, job_number
            )
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
            ),
        )
        stats = runner.run()
        # Success path only: after a failure the process exits non-zero and the
        # launcher (torchrun / srun --kill-on-bad-exit) tears the other ranks down.
        shutdown_distributed(context)
        return stats if context.rank == 0 else None
    finally:
        for sink_id in sink_ids:
            logger.remove(sink_id)


def hydra_task(cfg: Any) -> None:
    """Task function handed to ``hydra.main``; also what the submitit launcher pickles."""
    from omegaconf import OmegaConf

    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        run(container, job_number=_hydra_job_number())
    except USER_ERRORS as error:
        if os.environ.get("FLASHDREAMS_TRACEBACK") == "1":
            raise
        print(format_user_error(error), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
