"""Scheduler interface: a scheduler owns the whole denoising loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn

from flashdreams.infra.config import InstantiateConfig


class FlowPredictor(Protocol):
    """Closure ``(noisy_latent, timestep) -> predicted_flow`` called once per step."""

    def __call__(self, noisy_latent: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...


class NoiseSampler(Protocol):
    """``(like, rng) -> noise`` shaped like ``like``; used for every scheduler draw when given."""

    def __call__(self, like: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor: ...


class Scheduler(ABC, nn.Module):
    """Denoising scheduler: callers see only ``noise -> clean``.

    Shape-agnostic: every internal op broadcasts per-step scalar sigmas.
    Concrete configs declare their own ``num_inference_steps`` / ``shift``.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def sample(
        self,
        initial_noise: torch.Tensor,
        predict_flow: FlowPredictor,
        rng: torch.Generator | None = None,
        *,
        noise_like: NoiseSampler | None = None,
    ) -> torch.Tensor:
        """Run the full denoising loop from ``initial_noise`` (sigma=1) and return the clean latent.

        ``noise_like(x, rng)``, when given, makes every random draw (context-parallel
        transformers pass one so all ranks draw the same global noise).
        """

    @abstractmethod
    def add_noise(
        self,
        clean_input: torch.Tensor,
        timestep: torch.Tensor,
        rng: torch.Generator | None = None,
        *,
        noise_like: NoiseSampler | None = None,
    ) -> torch.Tensor:
        """Return ``(1 - sigma(t)) * x0 + sigma(t) * eps``, ``t`` snapped to the schedule."""


@dataclass(kw_only=True)
class SchedulerConfig(InstantiateConfig):
    """Base of every scheduler config (holds no shared fields)."""

    _target: type[Scheduler] = field(default_factory=lambda: Scheduler)
    """Scheduler class built by ``setup()``."""
