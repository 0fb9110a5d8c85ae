"""Flow-matching UniPC (BH2, order <= 2, predictor-corrector) with pre-baked coefficients.

Reproduces the upstream Wan 2.1 ``FlowUniPCMultistepScheduler`` as Wan calls it
(built with ``shift=1``, ``set_timesteps(num_steps, shift=shift)``,
``predict_x0=True``, ``solver_type="bh2"``, ``lower_order_final=True``,
``final_sigmas_type="zero"``, no disabled correctors):

- unshifted sigmas ``linspace(1 - 1/num_train_timesteps, 0, N + 1)[:-1]``,
  shifted by ``shift``; a final sigma 0 is appended;
- timesteps ``sigma * num_train_timesteps`` truncated to int64.

For flow matching ``alpha = 1 - sigma`` and ``lambda = log(alpha) - log(sigma)``.
Every step-dependent scalar of the solver (ratios, ``expm1(-h)`` terms, the
order-2 ``rho`` weights) depends only on the schedule, so it is computed once
at construction; :meth:`FlowMatchUniPCScheduler.sample` is plain tensor
arithmetic on the latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from flashdreams.infra.diffusion.scheduler.base import (
    FlowPredictor,
    Scheduler,
    SchedulerConfig,
)
from flashdreams.infra.diffusion.scheduler.fm import (
    Fp32ScheduleBuffersMixin,
    NoiseLike,
    add_noise_on_schedule,
    compute_dtype_for,
    maybe_progress_bar,
)

SUPPORTED_SOLVER_ORDERS = (1, 2)


@dataclass(kw_only=True)
class FlowMatchUniPCSchedulerConfig(SchedulerConfig):
    """Config for the flow-matching UniPC scheduler (Wan 2.1 defaults)."""

    _target: type[FlowMatchUniPCScheduler] = field(default_factory=lambda: FlowMatchUniPCScheduler)
    """Scheduler class built by ``setup()``."""
    num_inference_steps: int = 50
    """Number of denoising steps (one flow prediction each)."""
    shift: float = 5.0
    """Timestep shift applied to the inference sigmas; tune per checkpoint (e.g. 3.0 for Wan 2.1 I2V 480P)."""
    num_train_timesteps: int = 1000
    """Length of the training schedule; sets the top sigma ``1 - 1/num_train_timesteps``."""
    solver_order: int = 2
    """Multistep order of the UniPC predictor / corrector (1 or 2)."""
    use_kerras_sigma: bool = False
    """Karras sigma spacing (spelling kept for API compatibility); not supported, must stay False."""
    enable_tqdm: bool = False
    """Show a progress bar over denoising steps."""


@dataclass(frozen=True)
class _StepCoefficients:
    """Scalars of one UniPC update ``x_out = x * x_coef + m0 * m0_coef + d1 * d1_coef + dt * dt_coef``."""

    x_coef: float = 0.0
    m0_coef: float = 0.0
    d1_coef: float = 0.0
    dt_coef: float = 0.0

    def as_list(self) -> list[float]:
        return [self.x_coef, self.m0_coef, self.d1_coef, self.dt_coef]


class FlowMatchUniPCScheduler(Fp32ScheduleBuffersMixin, Scheduler):
    """Order-2 UniPC predictor-corrector (BH2) for flow-matching models.

    Per step ``i`` (``m_i`` = x0 estimate at step ``i``, ``x_i`` = model input):

    1. ``m_i = x_i - sigma_i * predict_flow(x_i, t_i)``
    2. corrector (``i > 0``): ``x_i <- c_x * x_{i-1} + c_m0 * m_{i-1}
       + c_d1 * (m_{i-2} - m_{i-1}) + c_dt * (m_i - m_{i-1})``
       (``x_{i-1}`` is the corrected input of the previous step)
    3. predictor: ``x_{i+1} = p_x * x_i + p_m0 * m_i + p_d1 * (m_{i-1} - m_i)``

    The ``d1`` terms exist only where the step runs at order 2 (warm-up and
    the final step run at order 1). The last step lands on sigma 0, where
    the predictor returns ``m_{N-1}`` exactly.

    Buffers (kept in their construction dtype under ``.to(dtype)``):
    ``sigmas`` fp32 ``[N + 1]``, ``timesteps`` int64 ``[N]``,
    ``predictor_coefficients`` / ``corrector_coefficients`` fp32 ``[N, 4]``
    with columns ``(x, m0, d1, dt)``.
    """

    config: FlowMatchUniPCSchedulerConfig

    def __init__(self, config: FlowMatchUniPCSchedulerConfig) -> None:
        super().__init__(config)
        _validate_unipc_config(config)

        sigmas, timesteps = _wan_flow_sigmas(
            config.num_inference_steps, config.shift, config.num_train_timesteps
        )
        num_steps = config.num_inference_steps
        sigma_values = [float(s) for s in sigmas]  # fp32-rounded values, as the loop uses them

        # Order of each step, as diffusers / Wan compute it with lower_order_final=True:
        # warm-up from order 1 and drop back to order 1 for the last step.
        predictor_orders = [
            min(config.solver_order, num_steps - step, step + 1) for step in range(num_steps)
        ]
        # The corrector at step i reuses the order the predictor had at step i - 1.
        corrector_orders = [0] + predictor_orders[:-1]

        predictor = [
            _predictor_coefficients(sigma_values, step, predictor_orders[step])
            for step in range(num_steps)
        ]
        corrector = [_StepCoefficients()] + [
            _corrector_coefficients(sigma_values, step, corrector_orders[step])
            for step in range(1, num_steps)
        ]

        self.predictor_orders: tuple[int, ...] = tuple(predictor_orders)
        self.corrector_orders: tuple[int, ...] = tuple(corrector_orders)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.register_buffer(
            "predictor_coefficients",
            torch.tensor([c.as_list() for c in predictor], dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "corrector_coefficients",
            torch.tensor([c.as_list() for c in corrector], dtype=torch.float32),
            persistent=False,
        )

    @property
    def num_inference_steps(self) -> int:
        return self.timesteps.shape[0]

    def sample(
        self,
        initial_noise: torch.Tensor,
        predict_flow: FlowPredictor,
        rng: torch.Generator | None = None,
        *,
        noise_like: NoiseLike | None = None,
    ) -> torch.Tensor:
        """Run the UniPC loop from ``initial_noise`` (sigma ~ 1) to the clean latent.

        Deterministic: ``rng`` and ``noise_like`` are accepted for interface
        conformance and unused. Arithmetic runs in at least fp32;
        ``predict_flow`` sees latents in ``initial_noise.dtype``; the result
        is cast back to it.
        """
        del rng, noise_like  # deterministic ODE solver
        out_dtype = initial_noise.dtype
        compute_dtype = compute_dtype_for(out_dtype)
        # Schedule on the latent's device (a no-op when the module was moved with it).
        device = initial_noise.device
        timesteps = self.timesteps.to(device)
        sigmas = self.sigmas.to(device=device, dtype=compute_dtype)
        predictor = self.predictor_coefficients.to(device=device, dtype=compute_dtype)
        corrector = self.corrector_coefficients.to(device=device, dtype=compute_dtype)

        sample = initial_noise.to(compute_dtype)
        previous_sample: torch.Tensor | None = None  # corrected model input of step i-1
        previous_clean: torch.Tensor | None = None  # m_{i-1}
        older_clean: torch.Tensor | None = None  # m_{i-2}
        steps = maybe_progress_bar(
            range(self.num_inference_steps), self.config.enable_tqdm, "unipc"
        )
        for step in steps:
            flow = predict_flow(sample.to(out_dtype), timesteps[step])
            clean = sample - sigmas[step] * flow.to(compute_dtype)

            corrector_order = self.corrector_orders[step]
            if corrector_order > 0:
                assert previous_sample is not None and previous_clean is not None
                x_coef, m0_coef, d1_coef, dt_coef = corrector[step]
                sample = (
                    x_coef * previous_sample
                    + m0_coef * previous_clean
                    + dt_coef * (clean - previous_clean)
                )
                if corrector_order == 2:
                    assert older_clean is not None
                    sample = sample + d1_coef * (older_clean - previous_clean)

            predictor_order = self.predictor_orders[step]
            x_coef, m0_coef, d1_coef, _ = predictor[step]
            next_sample = x_coef * sample + m0_coef * clean
            if predictor_order == 2:
                assert previous_clean is not None
                next_sample = next_sample + d1_coef * (previous_clean - clean)

            previous_sample = sample
            older_clean, previous_clean = previous_clean, clean
            sample = next_sample
        return sample.to(out_dtype)

    def add_noise(
        self,
        clean_input: torch.Tensor,
        timestep: torch.Tensor,
        rng: torch.Generator | None = None,
        *,
        noise_like: NoiseLike | None = None,
    ) -> torch.Tensor:
        """``(1 - sigma) * x0 + sigma * eps`` with ``timestep`` snapped to the inference schedule.

        The inference schedule has no ``t = 0`` entry: small timesteps snap to
        the last (smallest, non-zero) sigma.
        """
        return add_noise_on_schedule(
            clean_input, timestep, self.timesteps, self.sigmas, rng, noise_like=noise_like
        )


def _wan_flow_sigmas(
    num_inference_steps: int, shift: float, num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan 2.1 inference schedule: (fp32 sigmas ``[N + 1]`` ending in 0, int64 timesteps ``[N]``)."""
    import numpy as np

    sigma_max = 1.0 - 1.0 / num_train_timesteps  # top of the unshifted training table
    sigma_min = 0.0
    sigmas = np.linspace(sigma_max, sigma_min, num_inference_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)  # truncates
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas), timesteps


def _log_snr(sigma: float) -> float:
    """``lambda = log(alpha) - log(sigma)`` with ``alpha = 1 - sigma``; ``+inf`` at sigma 0."""
    if sigma == 0.0:
        return math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _predictor_coefficients(sigmas: list[float], step: int, order: int) -> _StepCoefficients:
    """UniPC-BH2 predictor from ``sigmas[step]`` to ``sigmas[step + 1]`` (x0-prediction form)."""
    sigma_source, sigma_target = sigmas[step], sigmas[step + 1]
    alpha_target = 1.0 - sigma_target
    lambda_source = _log_snr(sigma_source)
    h = _log_snr(sigma_target) - lambda_source
    h_phi_1 = math.expm1(-h)  # -> -1 when the target sigma is 0
    b_h = h_phi_1  # BH2: B(h) = expm1(-h)
    x_coef = sigma_target / sigma_source
    m0_coef = -alpha_target * h_phi_1
    d1_coef = 0.0
    if order == 2:
        rk = (_log_snr(sigmas[step - 1]) - lambda_source) / h
        rho = 0.5  # UniPC's closed-form order-2 predictor weight
        d1_coef = -alpha_target * b_h * rho / rk
    return _StepCoefficients(x_coef=x_coef, m0_coef=m0_coef, d1_coef=d1_coef)


def _corrector_coefficients(sigmas: list[float], step: int, order: int) -> _StepCoefficients:
    """UniPC-BH2 corrector re-targeting ``sigmas[step]`` from ``sigmas[step - 1]``."""
    sigma_source, sigma_target = sigmas[step - 1], sigmas[step]
    alpha_target = 1.0 - sigma_target
    lambda_source = _log_snr(sigma_source)
    h = _log_snr(sigma_target) - lambda_source
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1  # BH2
    x_coef = sigma_target / sigma_source
    m0_coef = -alpha_target * h_phi_1
    if order == 1:
        return _StepCoefficients(x_coef=x_coef, m0_coef=m0_coef, dt_coef=-alpha_target * b_h * 0.5)
    # Order 2: solve R rho = b with R = [[1, 1], [rk, 1]] (rows are powers of r = (rk, 1)).
    h_phi_k = h_phi_1 / hh - 1.0
    b_first = h_phi_k / b_h
    h_phi_k = h_phi_k / hh - 0.5
    b_second = h_phi_k * 2.0 / b_h
    rk = (_log_snr(sigmas[step - 2]) - lambda_source) / h
    rho_history = (b_first - b_second) / (1.0 - rk)
    rho_current = b_first - rho_history
    return _StepCoefficients(
        x_coef=x_coef,
        m0_coef=m0_coef,
        d1_coef=-alpha_target * b_h * rho_history / rk,
        dt_coef=-alpha_target * b_h * rho_current,
    )


def _validate_unipc_config(config: FlowMatchUniPCSchedulerConfig) -> None:
    if config.use_kerras_sigma:
        raise NotImplementedError(
            "FlowMatchUniPCSchedulerConfig.use_kerras_sigma=True is not supported: only the "
            "Wan flow-matching sigma schedule is implemented; set use_kerras_sigma=False"
        )
    if config.num_inference_steps < 1:
        raise ValueError(
            f"FlowMatchUniPCSchedulerConfig.num_inference_steps must be >= 1, "
            f"got {config.num_inference_steps}"
        )
    if config.solver_order not in SUPPORTED_SOLVER_ORDERS:
        raise ValueError(
            f"FlowMatchUniPCSchedulerConfig.solver_order must be one of "
            f"{SUPPORTED_SOLVER_ORDERS}, got {config.solver_order}"
        )
    if config.shift <= 0:
        raise ValueError(
            f"FlowMatchUniPCSchedulerConfig.shift must be positive, got {config.shift}"
        )
    if config.num_train_timesteps < 2:
        raise ValueError(
            f"FlowMatchUniPCSchedulerConfig.num_train_timesteps must be >= 2, "
            f"got {config.num_train_timesteps}"
        )
