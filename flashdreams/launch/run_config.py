"""The config of one run: pipeline + runner + parallel, built from composed YAML and saved back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flashdreams.infra.config import PrintableConfig
from flashdreams.launch.config_tree import build_config, config_to_container


@dataclass(kw_only=True)
class ParallelConfig(PrintableConfig):
    """Process-group settings. The context-parallel size is always the world size."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto`` picks NCCL when CUDA is available, else gloo."""
    init_timeout_s: int = 600
    """Timeout of process-group collectives at start-up, in seconds."""


@dataclass(kw_only=True)
class RunConfig:
    """Typed config of a run."""

    pipeline: Any
    """Pipeline config (a ``StreamInferencePipelineConfig`` subclass)."""
    runner: Any
    """Runner config (a ``RunnerConfig`` subclass)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process-group settings."""


SECTIONS = ("pipeline", "runner", "parallel")


def build_run_config(container: dict[str, Any]) -> RunConfig:
    """Typed :class:`RunConfig` from the composed, resolved Hydra config as plain data."""
    from flashdreams.infra.pipeline import StreamInferencePipelineConfig
    from flashdreams.runner.runner import RunnerConfig

    unknown = sorted(set(container) - set(SECTIONS))
    if unknown:
        raise KeyError(
            f"unknown config key '{unknown[0]}' at the top level. Valid keys: {', '.join(SECTIONS)}"
        )
    if "pipeline" not in container:
        raise KeyError("the composed config has no 'pipeline' section")
    pipeline = build_config(
        container["pipeline"], path="pipeline", allowed=[StreamInferencePipelineConfig]
    )
    runner = build_config(
        container.get("runner") or {},
        path="runner",
        default_class=RunnerConfig,
        allowed=[RunnerConfig],
    )
    parallel = build_config(
        container.get("parallel") or {}, path="parallel", default_class=ParallelConfig
    )
    return RunConfig(pipeline=pipeline, runner=runner, parallel=parallel)


def run_config_to_container(run_config: RunConfig) -> dict[str, Any]:
    return {name: config_to_container(getattr(run_config, name), path=name) for name in SECTIONS}


def run_config_yaml(container: dict[str, Any]) -> str:
    """The plain-data config as YAML text.

    Plain YAML, not OmegaConf: a value such as a prompt holding ``${HOME}`` is saved as
    the text it is, and :func:`load_run_config` reads it back unchanged.
    """
    import yaml

    return yaml.safe_dump(
        container, sort_keys=False, allow_unicode=True, width=float("inf"), default_flow_style=False
    )


def save_run_config(container: dict[str, Any], path: str | Path) -> None:
    """Write the plain-data config as YAML (temporary name, then rename)."""
    from flashdreams.runner.safety import atomic_write_text

    atomic_write_text(path, run_config_yaml(container))


def load_run_config(path: str | Path) -> RunConfig:
    """Reload a saved ``config.yaml`` into an equal :class:`RunConfig`."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        container = yaml.safe_load(handle)
    return build_run_config(container)
