"""Denoising schedulers (flow-match self-forcing and flow-match UniPC)."""

from flashdreams.infra.diffusion.scheduler.base import FlowPredictor, Scheduler, SchedulerConfig

__all__ = ["FlowPredictor", "Scheduler", "SchedulerConfig"]
