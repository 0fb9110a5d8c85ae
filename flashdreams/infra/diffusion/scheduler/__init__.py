"""Denoising schedulers (flow-match self-forcing and flow-match UniPC)."""

from flashdreams.infra.diffusion.scheduler.base import FlowPredictor, Scheduler, SchedulerConfig
from flashdreams.infra.diffusion.scheduler.fm import (
    FlowMatchScheduler,
    FlowMatchSchedulerConfig,
)
from flashdreams.infra.diffusion.scheduler.unipc import (
    FlowMatchUniPCScheduler,
    FlowMatchUniPCSchedulerConfig,
)

__all__ = [
    "FlowMatchScheduler",
    "FlowMatchSchedulerConfig",
    "FlowMatchUniPCScheduler",
    "FlowMatchUniPCSchedulerConfig",
    "FlowPredictor",
    "Scheduler",
    "SchedulerConfig",
]
