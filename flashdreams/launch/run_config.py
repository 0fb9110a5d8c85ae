"""The config of one run: pipeline + runner + parallel, built from composed YAML and saved back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flashdreams.infra.config import PrintableConfig
from flashdreams.launch.config_tree import build_config, config_to_container

if TYPE_CHECKING:
    from flashdreams.core.distributed.plan import ParallelPlan


@dataclass(kw_only=True)
class ParallelConfig(PrintableConfig):
    """The run's one parallel plan: process-group settings and how the ranks are used.

    The launcher validates it and builds the process groups once
    (:func:`~flashdreams.core.distributed.plan.build_parallel_plan`), then hands
    the plan down to the pipeline. The context-parallel size is the world size
    (half of it with ``cfg_parallel``).
    """

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto`` picks NCCL when CUDA is available, else gloo."""
    init_timeout_s: int = 600
    """Timeout of process-group collectives at start-up, in seconds."""
    ulysses_degree: int | None = None
    """Ranks per Ulysses group inside a CP group. With ``ring_degree`` also unset, the
    network's ``cp_method`` chooses (``ring``: 1, ``ulysses``: the whole CP group); a
    divisor in between selects USP (Ulysses inside groups, ring across them). Must
    divide the network's head count."""
    ring_degree: int | None = None
    """Ranks per ring group inside a CP group; derived from ``ulysses_degree`` when unset."""
    cfg_parallel: bool = False
    """Run the two CFG branches on the two halves of the ranks instead of batched on
    every rank: the first half runs the conditional branch, the second half the
    unconditional one, each half context-parallel over ``world_size / 2`` ranks. Each
    rank runs and caches only its branch; after every forward the partner ranks ``r``
    and ``r + world_size / 2`` exchange their predictions (one all-gather). Needs CFG
    (``guidance_scale > 1``) and an even world size."""

    decode: Literal["rank0", "parallel", "dedicated"] = "rank0"
    """Which ranks decode each chunk. ``rank0``: the rank holding the gathered latent
    decodes the whole frame while the others wait. ``parallel``: every rank decodes one
    row slab of each frame (exact, the same video as ``rank0``; decoder memory per rank
    scales with its slab) and rank 0 assembles the pixels. Needs a decoder that decodes
    row slabs (the Wan 2.1 / 2.2 VAE, TAEHV); not combined with ``runner.overlap_decode``.
    ``dedicated`` (2 ranks or more): the last rank only decodes, chunk ``i`` while the
    other ranks (context parallel among themselves) run the DiT on chunk ``i + 1``; rank 0
    writes the frames it sends back. With ``cfg_parallel`` it needs an odd world size. Not
    combined with ``runner.overlap_decode`` (it is that overlap, on its own rank) nor with
    ``runner.quality_check``."""

    def build_plan(self) -> ParallelPlan:
        """The :class:`ParallelPlan` of this process (collective: every rank calls it)."""
        from flashdreams.core.distributed.plan import build_parallel_plan

        return build_parallel_plan(
            ulysses_degree=self.ulysses_degree,
            ring_degree=self.ring_degree,
            cfg_parallel=self.cfg_parallel,
            decode=self.decode,
        )


@dataclass(kw_only=True)
class RunConfig:
    """Typed config of a run."""

    pipeline: Any
    """Pipeline config (a ``StreamInferencePipelineConfig`` subclass)."""
    runner: Any
    """Runner config (a ``RunnerConfig`` subclass)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process-group settings and the parallel plan."""


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


def load_run_config(path: str | Path) -> RunConfig:
    """Reload a saved ``config.yaml`` into an equal :class:`RunConfig`."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        container = yaml.safe_load(handle)
    return build_run_config(container)
