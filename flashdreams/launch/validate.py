"""Checks of a run's config made before any directory is created or any weight is loaded.

``flashdreams-run`` calls :func:`validate_before_work` on every rank before it joins the
process group; ``--cfg job`` calls it (without the checkpoint and memory checks) before it
prints. Problems raise ``ValueError`` / ``FileNotFoundError`` / ``KeyError`` in user words.
"""

from __future__ import annotations

from typing import Any


def validate_before_work(run_config: Any, *, checkpoints: bool = True, memory: bool = True) -> None:
    """Every check that needs no weights: runner values, sizes, inputs, checkpoints, memory."""
    from flashdreams.runner.runner import validate_runner_config

    validate_runner_config(run_config.runner)
