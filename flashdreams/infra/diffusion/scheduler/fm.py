"""Flow-matching scheduler with self-forcing re-noise (DiffSynth / Self-Forcing style).

The training schedule is a shifted linspace of ``num_train_timesteps`` sigmas.
A short list of denoising timesteps (e.g. ``[1000, 750, 500, 250]``) is
optionally *warped* onto that table: entry ``t`` becomes
``timesteps[num_train_timesteps - t]`` (a trailing 0 is appended so ``t = 0``
is valid). Each step converts the predicted flow into an ``x0`` estimate and
re-noises it to the *next* step's sigma with fresh Gaussian noise.

This module also holds two small helpers shared with the UniPC scheduler:
:class:`Fp32ScheduleBuffersMixin` and :func:`snap_to_schedule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from loguru import logger

from flashdreams.infra.diffusion.noise import NoiseSource, entry_shape, randn_entries
from flashdreams.infra.diffusion.scheduler.base import (
    FlowPredictor,
    Scheduler,
    SchedulerConfig,
)

NoiseLike = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
"""``noise_like(x, rng)``: standard Gaussian noise with the shape, device and dtype of ``x``."""


def draw_noise_like(x: torch.Tensor, rng: NoiseSource = None) -> torch.Tensor:
    """Default ``noise_like``: ``torch.randn`` in the shape / device / dtype of ``x``
    (one generator per batched rollout: each draws its own rows)."""
    return randn_entries(entry_shape(tuple(x.shape), rng), rng, device=x.device, dtype=x.dtype)


def snap_to_schedule(timestep: torch.Tensor, schedule_timesteps: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ``schedule_timesteps`` for every element of ``timestep``.

    Ties go to the first (i.e. noisier) entry. The result has ``timestep``'s shape.
    """
    query = timestep.to(device=schedule_timesteps.device, dtype=torch.float64)
    table = schedule_timesteps.to(torch.float64)
    distance = (query.reshape(-1, 1) - table.reshape(1, -1)).abs()
    return distance.argmin(dim=1).reshape(query.shape)


def broadcast_per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a scalar or per-batch ``[B]`` sigma so it broadcasts against ``like`` (``[B, ...]``)."""
    if sigma.dim() == 0 or sigma.numel() == 1:
        return sigma.reshape(())
    if sigma.dim() == 1 and like.dim() >= 1 and sigma.shape[0] == like.shape[0]:
        return sigma.reshape(-1, *([1] * (like.dim() - 1)))
    raise ValueError(
        f"timestep must be a scalar or a 1-D tensor with one entry per batch element "
        f"(batch size {like.shape[0] if like.dim() else 'n/a'}), got shape {tuple(sigma.shape)}"
    )


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Dtype for schedule arithmetic: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class Fp32ScheduleBuffersMixin:
    """Keeps every registered buffer in its construction dtype across ``module.to(...)``.

    ``nn.Module.to(torch.bfloat16)`` would otherwise round schedule tables
    (1000 becomes 1024 in bf16). Buffers follow device moves only; each one is
    re-copied from the untouched original so no precision is lost.
    """

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        originals = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)  # type: ignore[misc]
        for name, original in originals.items():
            moved = self._buffers[name]
            self._buffers[name] = original.to(device=moved.device)
        return self


def maybe_progress_bar(steps: Iterable[int], enabled: bool, description: str) -> Iterable[int]:
    """Wrap ``steps`` in a tqdm bar when ``enabled`` (tqdm imported only then)."""
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=description)


@dataclass(kw_only=True)
class FlowMatchSchedulerConfig(SchedulerConfig):
    """Config for the flow-matching scheduler with self-forcing re-noise."""

    _target: type[FlowMatchScheduler] = field(default_factory=lambda: FlowMatchScheduler)
    """Scheduler class built by ``setup()``."""
    num_inference_steps: int = 4
    """Number of denoising steps. If it differs from ``len(denoising_timesteps)`` and that list is
    evenly spaced (like the default), an evenly spaced list of this length is used instead."""
    shift: float = 8.0
    """Timestep shift ``sigma' = shift * s / (1 + (shift - 1) * s)`` applied to the training schedule."""
    denoising_timesteps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    """Denoising timesteps, noisiest first; warped onto the shifted schedule when ``warp_denoising_step``."""
    warp_denoising_step: bool = True
    """Map each entry ``t`` to ``timesteps[num_train_timesteps - t]`` of the shifted schedule (Self-Forcing)."""
    num_train_timesteps: int = 1000
    """Length of the training schedule the denoising timesteps index into."""
    sigma_max: float = 1.0
    """Top of the sigma linspace before shifting; 1.0 as in DiffSynth (upstream Wan uses 0.999)."""
    sigma_min: float = 0.0
    """Bottom of the sigma linspace before shifting; kept for upstream parity, normally 0.0."""
    extra_one_step: bool = True
    """Build sigmas as ``linspace(sigma_max, sigma_min, N + 1)[:-1]``; ``False`` uses ``N`` points."""
    timestep_dtype: torch.dtype = torch.float32
    """Dtype of the timesteps handed to the flow predictor (e.g. ``torch.int64`` to truncate warped values)."""
    enable_tqdm: bool = False
    """Show a progress bar over denoising steps."""


class FlowMatchScheduler(Fp32ScheduleBuffersMixin, Scheduler):
    """Flow-matching scheduler: predict flow, take ``x0``, re-noise to the next sigma.

    ::

        x_t = initial_noise
        for i, t in enumerate(denoising_step_list):
            v = predict_flow(x_t, t)
            x0 = x_t - sigma_i * v
            if i is not the last step:
                x_t = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * eps
        return x0

    Buffers (all pinned to their construction dtype under ``.to(dtype)``):

    - ``schedule_sigmas`` / ``schedule_timesteps``: fp32 training schedule,
      ``num_train_timesteps`` entries plus a trailing 0.
    - ``step_sigmas``: fp32 sigma of each denoising step.
    - ``denoising_step_list``: the per-step timesteps in ``timestep_dtype``.
    """

    config: FlowMatchSchedulerConfig

    def __init__(self, config: FlowMatchSchedulerConfig) -> None:
        super().__init__(config)
        _validate_flow_match_config(config)

        num_train = config.num_train_timesteps
        num_points = num_train + 1 if config.extra_one_step else num_train
        # fp32 arithmetic throughout, as in DiffSynth's FlowMatchScheduler.set_timesteps.
        sigmas = torch.linspace(config.sigma_max, config.sigma_min, num_points, dtype=torch.float32)
        if config.extra_one_step:
            sigmas = sigmas[:-1]
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
        timesteps = sigmas * num_train
        # Trailing zero: lets ``t = 0`` warp to index num_train and snap to sigma 0.
        zero = torch.zeros(1, dtype=torch.float32)
        schedule_sigmas = torch.cat([sigmas, zero])
        schedule_timesteps = torch.cat([timesteps, zero])

        requested = torch.tensor(resolve_denoising_timesteps(config), dtype=torch.float32)
        if config.warp_denoising_step:
            step_timesteps = schedule_timesteps[num_train - requested.long()]
        else:
            step_timesteps = requested
        step_sigmas = schedule_sigmas[snap_to_schedule(step_timesteps, schedule_timesteps)]

        self.register_buffer("schedule_sigmas", schedule_sigmas, persistent=False)
        self.register_buffer("schedule_timesteps", schedule_timesteps, persistent=False)
        self.register_buffer("step_sigmas", step_sigmas, persistent=False)
        self.register_buffer(
            "denoising_step_list", step_timesteps.to(config.timestep_dtype), persistent=False
        )

    @property
    def num_inference_steps(self) -> int:
        return self.step_sigmas.shape[0]

    def sample(
        self,
        initial_noise: torch.Tensor,
        predict_flow: FlowPredictor,
        rng: torch.Generator | None = None,
        *,
        noise_like: NoiseLike | None = None,
    ) -> torch.Tensor:
        """Run the self-forcing loop; returns the last ``x0`` in ``initial_noise.dtype``.

        ``noise_like(x, rng)`` (default :func:`draw_noise_like`) makes every
        re-noise draw; ``predict_flow`` sees latents in ``initial_noise.dtype``.
        """
        noise_like = noise_like or draw_noise_like
        out_dtype = initial_noise.dtype
        compute_dtype = compute_dtype_for(out_dtype)
        last_step = self.num_inference_steps - 1
        # Schedule on the latent's device (a no-op when the module was moved with it).
        device = initial_noise.device
        step_timesteps = self.denoising_step_list.to(device)
        step_sigmas = self.step_sigmas.to(device=device, dtype=compute_dtype)

        noisy = initial_noise
        clean = initial_noise.to(compute_dtype)
        steps = maybe_progress_bar(
            range(self.num_inference_steps), self.config.enable_tqdm, "flow-match"
        )
        for step in steps:
            flow = predict_flow(noisy, step_timesteps[step])
            sigma = step_sigmas[step]
            clean = noisy.to(compute_dtype) - sigma * flow.to(compute_dtype)
            if step < last_step:
                next_sigma = step_sigmas[step + 1]
                eps = noise_like(initial_noise, rng).to(compute_dtype)
                noisy = ((1 - next_sigma) * clean + next_sigma * eps).to(out_dtype)
        return clean.to(out_dtype)

    def add_noise(
        self,
        clean_input: torch.Tensor,
        timestep: torch.Tensor,
        rng: torch.Generator | None = None,
        *,
        noise_like: NoiseLike | None = None,
    ) -> torch.Tensor:
        """``(1 - sigma) * x0 + sigma * eps`` with ``timestep`` snapped to the training schedule.

        The table is the shifted training schedule plus a trailing 0, so
        ``timestep = 0`` returns ``clean_input`` unchanged (up to dtype).
        ``timestep`` is a scalar or one value per batch element.
        """
        return add_noise_on_schedule(
            clean_input,
            timestep,
            self.schedule_timesteps,
            self.schedule_sigmas,
            rng,
            noise_like=noise_like,
        )


def add_noise_on_schedule(
    clean_input: torch.Tensor,
    timestep: torch.Tensor,
    schedule_timesteps: torch.Tensor,
    schedule_sigmas: torch.Tensor,
    rng: torch.Generator | None = None,
    *,
    noise_like: NoiseLike | None = None,
) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * eps``, ``sigma`` of ``timestep`` snapped to the schedule.

    ``timestep`` is a scalar or one value per batch element; the noise comes from
    ``noise_like(x0, rng)`` (default: a plain draw) and the sum is computed in
    fp32 (fp64 for fp64 inputs).
    """
    noise_like = noise_like or draw_noise_like
    index = snap_to_schedule(torch.as_tensor(timestep), schedule_timesteps)
    compute_dtype = compute_dtype_for(clean_input.dtype)
    sigma = schedule_sigmas[index].to(device=clean_input.device, dtype=compute_dtype)
    sigma = broadcast_per_sample(sigma, clean_input)
    eps = noise_like(clean_input, rng).to(compute_dtype)
    noisy = (1 - sigma) * clean_input.to(compute_dtype) + sigma * eps
    return noisy.to(clean_input.dtype)


def uniform_denoising_timesteps(num_steps: int, num_train_timesteps: int) -> list[int]:
    """Evenly spaced timesteps ``num_train * (1 - i / num_steps)``; 4 of 1000 -> [1000, 750, 500, 250]."""
    return [round(num_train_timesteps * (1 - i / num_steps)) for i in range(num_steps)]


def resolve_denoising_timesteps(config: FlowMatchSchedulerConfig) -> list[int]:
    """The denoising timesteps to run, reconciled with ``num_inference_steps``.

    Equal lengths: the list as given. Different lengths: an evenly spaced list
    (which carries nothing but its length) is regenerated with
    ``num_inference_steps`` entries, so ``num_inference_steps=2`` on the default
    config runs ``[1000, 500]``; a hand-picked list raises ``ValueError``.
    """
    steps = list(config.denoising_timesteps)
    num_steps = config.num_inference_steps
    if num_steps < 1:
        raise ValueError(
            f"FlowMatchSchedulerConfig.num_inference_steps must be >= 1, got {num_steps}"
        )
    if len(steps) == num_steps:
        return steps
    num_train = config.num_train_timesteps
    if steps and steps == uniform_denoising_timesteps(len(steps), num_train):
        resolved = uniform_denoising_timesteps(num_steps, num_train)
        logger.debug(
            f"FlowMatchScheduler: num_inference_steps={num_steps} overrides the evenly spaced "
            f"denoising_timesteps {steps}; running {resolved}"
        )
        return resolved
    raise ValueError(
        f"FlowMatchSchedulerConfig: num_inference_steps={num_steps} but denoising_timesteps "
        f"has {len(steps)} entries ({steps}); give denoising_timesteps exactly "
        f"{num_steps} entries, e.g. {uniform_denoising_timesteps(num_steps, num_train)}"
    )


def _validate_flow_match_config(config: FlowMatchSchedulerConfig) -> None:
    if config.num_train_timesteps <= 0:
        raise ValueError(
            f"FlowMatchSchedulerConfig.num_train_timesteps must be positive, "
            f"got {config.num_train_timesteps}"
        )
    steps = resolve_denoising_timesteps(config)
    if config.shift <= 0:
        raise ValueError(f"FlowMatchSchedulerConfig.shift must be positive, got {config.shift}")
    if config.warp_denoising_step:
        bad = [t for t in steps if int(t) != t or not 0 <= t <= config.num_train_timesteps]
        if bad:
            raise ValueError(
                f"FlowMatchSchedulerConfig: with warp_denoising_step every denoising timestep must "
                f"be an integer in [0, {config.num_train_timesteps}], got {bad}"
            )
