"""Runners: command-line-facing I/O (prompts, rollout loop, persistence) and the slug registry."""

from flashdreams.runner.registry import (
    ENTRY_POINT_GROUP,
    DuplicateSlugError,
    RunnerEntry,
    discover_runners,
    get_runner_entry,
)
from flashdreams.runner.runner import RunContext, Runner, RunnerConfig

__all__ = [
    "ENTRY_POINT_GROUP",
    "DuplicateSlugError",
    "RunContext",
    "Runner",
    "RunnerConfig",
    "RunnerEntry",
    "discover_runners",
    "get_runner_entry",
]
